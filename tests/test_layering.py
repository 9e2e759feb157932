"""The package's layering (import-linter contracts in pyproject.toml) and the stage resource contract:
what ``build()`` makes is never pickled, and a copy builds its own on first use."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from dataflywheel.filters.safety import SensitiveContent
from dataflywheel.filters.url import UrlFilter
from dataflywheel.selectors.diversity_stage import Diversity
from dataflywheel.selectors.instag import InsTagTag
from dataflywheel.selectors.mixture import Mixture
from dataflywheel.synth.generate import Generate
from dataflywheel.synth.judge import Judge
from dataflywheel.synth.score import Verify

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


ANSWERED = {"id": "q", "prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4",
            "completions": [{"index": 0, "text": "2 + 2 = 4", "finish_reason": "stop", "rejected": None}]}

# (stage, its resources, a first use that needs them)
CASES = {
    "generate": (lambda: Generate(backend={"model": "unused"}), ("backend",), lambda s: s.backend.model),
    "judge": (lambda: Judge(backend={"model": "unused"}), ("backend",), lambda s: s.backend.model),
    "instag_tag": (lambda: InsTagTag(backend={"model": "unused"}), ("backend",), lambda s: s.backend.model),
    "verify": (lambda: Verify(verifier="numeric_match"), ("fn", "prov"),
               lambda s: s.score([ANSWERED])[0]["completions"][0]["scores"]["verifier"]),
    "sensitive_content": (lambda: SensitiveContent(), ("keywords", "regexes", "names"),
                          lambda s: s.score([{"id": "d", "text": "a plain text"}])[0]["scores"]["sensitive_hits"]),
    "url_filter": (lambda: UrlFilter(), ("domains", "urls", "banned", "soft", "substrings", "allowed"),
                   lambda s: s.score([{"id": "d", "text": "x", "url": "https://example.com/a"}])[0]["scores"]),
    "mixture": (lambda: Mixture(strategy="proportional", budget=1, group_by="source"), ("_tokenizer",),
                lambda s: s._tokenizer),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_built_resources_are_not_pickled_and_a_copy_rebuilds_them_on_first_use(case):
    make, resources, use = CASES[case]
    stage = make()
    stage.setup()
    assert all(name in stage.__dict__ for name in resources)
    expected = use(stage)
    state = stage.__getstate__()
    assert not set(resources) & set(state)
    copy = pickle.loads(pickle.dumps(stage))
    assert not set(resources) & set(copy.__dict__)  # nothing built yet on the "worker"
    assert use(copy) == expected  # first use builds them
    assert all(name in copy.__dict__ for name in resources)
    copy.teardown()
    assert not set(resources) & set(copy.__dict__)


def test_teardown_closes_a_built_cache_and_never_builds_one(tmp_path):
    stage = Diversity(budget=1, cache=str(tmp_path / "vectors.sqlite"))
    stage.teardown()  # never built: nothing to close, and nothing gets built
    assert "cache" not in stage.__dict__
    stage.setup()
    cache = stage.cache
    stage.teardown()
    assert "cache" not in stage.__dict__
    stage.setup()  # a later setup() builds a fresh one
    assert stage.cache is not cache
    stage.teardown()
