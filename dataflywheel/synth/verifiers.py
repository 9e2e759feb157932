"""Rule verifiers: score a completion against a known answer with no model in the loop.

GRPO turns them into rewards (RLVR: a checkable answer is a reward that cannot be gamed the way a
learned reward model can), and the scoring stages reuse them, so they are plain functions of
``(completion, answer) -> float`` in [0, 1]. A batch contract on top, ``RewardFn``, is what GRPO
calls: ``reward(prompt_rows, completions) -> [float | None]``, row i paired with completion i (the
caller repeats a prompt row once per sample), None meaning "could not score" (no answer in the row,
an answer that does not parse), which GRPO leaves out of the group statistics instead of counting
as a wrong answer (TRL turns None into NaN for the same reason, docs/sources.md#grpo).

``load_verifier`` imports a user function named ``"module:function"`` (or
``"path/to/file.py:function"``): either a per-completion verifier with the built-ins' signature,
which ``verifier_reward`` turns into a ``RewardFn``, or a ``RewardFn`` itself, used as is (e.g.
``flywheel/tasks/arithmetic.py:reward``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import string
import unicodedata
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from dataflywheel.errors import UserError

RewardFn = Callable[[list[dict], list[str]], list[float | None]]

# Math-Verify's verify(float_rounding=6): numbers that agree to 6 decimal places are equal, so
# "0.333333" matches 1/3; in absolute terms about 1e-6, and no relative slack beyond it.
ABS_TOL = 1e-6
REL_TOL = 0.0
ANSWER_FIELDS = ("answer", "meta.answer")  # where verifier_reward looks for the reference, in order

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EDGE_PUNCT = string.punctuation + string.whitespace + "“”‘’«»…"
# One number: an optional sign (not right after a word character or a dot, so "5-3" is 5 and 3, not
# 5 and -3), then a LaTeX \frac{a}{b}, an integer fraction a/b (not part of a date, 1/2/2024), a
# comma-grouped integer ("1,234"; a group is exactly 3 digits, so "1,2,3" is a list), or a plain
# decimal, with an optional exponent.
_NUMBER = re.compile(
    r"""(?<![\w.])(?P<sign>[-+\u2212])?
    (?: \\d?frac\{(?P<fnum>\d+)\}\{(?P<fden>\d*[1-9]\d*)\}
      | (?<![/\d])(?P<num>\d+)/(?P<den>\d*[1-9]\d*)(?![\d./])
      | (?P<dec>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)? | \.\d+)
    )""",
    re.VERBOSE,
)


def normalize_text(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer`` (case, articles, whitespace), except that punctuation is
    stripped only at the ends: removing it inside would make "3.5" equal "35"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(_ARTICLES.sub(" ", text).split())
    return text.strip(_EDGE_PUNCT)


def extract_numbers(text: str) -> list[Fraction]:
    """Every number in ``text``, in order, as exact fractions ("1,234.5" -> 2469/2, "3/4" -> 3/4)."""
    out = []
    for m in _NUMBER.finditer(text):
        if m["fnum"] is not None:
            value = Fraction(int(m["fnum"]), int(m["fden"]))
        elif m["num"] is not None:
            value = Fraction(int(m["num"]), int(m["den"]))
        else:
            value = Fraction(m["dec"].replace(",", ""))
        out.append(-value if m["sign"] in ("-", "\u2212") else value)
    return out


def parse_number(answer: Any) -> Fraction:
    """A reference answer as a number: an int or float, or a string holding exactly one number."""
    if isinstance(answer, bool):
        raise ValueError(f"not a number: {answer!r}")
    if isinstance(answer, (int, float, Fraction)):
        if isinstance(answer, float) and not math.isfinite(answer):
            raise ValueError(f"not a finite number: {answer!r}")
        return Fraction(answer)
    found = extract_numbers(str(answer))
    if len(found) != 1:
        raise ValueError(f"answer {answer!r} holds {len(found)} numbers, expected exactly one")
    return found[0]


def numbers_equal(a: Fraction, b: Fraction, *, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)
    except OverflowError:  # beyond float range: only exact equality counts
        return False


def exact_match(completion: str, answer: Any, *, normalize: bool = True) -> float:
    """1.0 when the completion is the answer (after ``normalize_text`` on both, unless told not to)."""
    if normalize:
        return float(normalize_text(completion) == normalize_text(str(answer)))
    return float(completion == str(answer))


def numeric_match(completion: str, answer: Any, *, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> float:
    """1.0 when the *last* number in the completion (the conclusion of a worked answer) equals the
    answer within the tolerances; 0.0 when it differs or there is none. Raises ``ValueError`` when
    the answer itself is not one number."""
    target = parse_number(answer)
    found = extract_numbers(completion)
    return float(bool(found) and numbers_equal(found[-1], target, rel_tol=rel_tol, abs_tol=abs_tol))


def regex_match(completion: str, pattern: str | re.Pattern, *, flags: int = 0) -> float:
    """1.0 when ``pattern`` is found anywhere in the completion (``re.search``; anchor it with ^...$
    to require the whole text)."""
    compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
    return float(compiled.search(completion) is not None)


BUILTIN: dict[str, Callable[..., float]] = {
    "exact_match": exact_match, "numeric_match": numeric_match, "regex_match": regex_match}


def load_verifier(path: str) -> Callable[..., Any]:
    """The function named by ``"package.module:function"`` or ``"file.py:function"``; a
    ``UserError`` naming ``path`` when it cannot be found or is not callable."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"verifier {path!r}: expected 'module:function' (e.g. 'my_rewards:score')")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"no such file: {file}")
            spec = importlib.util.spec_from_file_location(f"_dataflywheel_verifier_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except Exception as err:  # an import runs user code: any failure is the user's to fix
        raise UserError(f"verifier {path!r}: cannot import {module_name!r}: {type(err).__name__}: {err}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"verifier {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"verifier {path!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _lookup(row: dict, fields: tuple[str, ...]) -> Any:
    """The first of ``fields`` (dotted paths into nested dicts) present and not None in ``row``."""
    for name in fields:
        value: Any = row
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def verifier_reward(name: str, *, field: str | None = None, **options: Any) -> RewardFn:
    """A ``RewardFn`` scoring each completion with verifier ``name`` (a built-in name or
    ``"module:function"``) against its prompt row's reference: ``field`` (a dotted path) or, by
    default, ``answer`` then ``meta.answer``. ``options`` go to the verifier (``normalize``,
    ``rel_tol``, ``abs_tol``, ``flags``); ``regex_match`` with a ``pattern`` option uses that one
    pattern for every row instead of the row's field.

    A row without a reference, or whose verifier raises, scores None. A verifier that raises on
    every row of a batch is broken, not unlucky, so that error is raised.
    """
    if name in BUILTIN:
        fn = BUILTIN[name]
    elif ":" in name:
        fn = load_verifier(name)
    else:
        raise UserError(f"unknown verifier {name!r}: use one of {', '.join(BUILTIN)} or 'module:function'")
    fields = (field,) if field else ANSWER_FIELDS
    fixed = options.pop("pattern", None) if fn is regex_match else None
    if fixed is not None:
        try:
            fixed = re.compile(fixed, options.pop("flags", 0))
        except re.error as err:
            raise UserError(f"verifier {name!r}: bad regex pattern {fixed!r}: {err}") from err
    try:
        inspect.signature(fn).bind("", "", **options)  # unknown options fail now, not on every row
    except TypeError as err:
        raise UserError(f"verifier {name!r}: bad options {sorted(options)}: {err}") from err

    def reward(rows: list[dict], completions: list[str]) -> list[float | None]:
        if len(rows) != len(completions):
            raise ValueError(f"{len(rows)} prompt rows for {len(completions)} completions")
        out: list[float | None] = []
        errors: list[Exception] = []
        for row, completion in zip(rows, completions):
            reference = fixed if fixed is not None else _lookup(row, fields)
            if reference is None:
                out.append(None)
                continue
            try:
                value = fn(completion, reference, **options)
            except Exception as err:  # one unscorable row (an answer that does not parse)
                errors.append(err)
                value = None
            out.append(None if value is None else float(value))
        if errors and len(errors) == len(rows):
            raise errors[0]
        return out

    reward.__name__ = reward.__qualname__ = name
    return reward
