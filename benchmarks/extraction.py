"""HTML extraction: our ``extract`` stage (sandbox on) vs the extractor called directly, same pages.

Data (the folder named by ``DATAFLYWHEEL_SHARED_DATA``, by default the data folder beside the
repository; see its README):

- ``trafilatura_eval``: 693 of trafilatura's 990 evaluation pages with their ``with`` / ``without``
  segments. Metric as trafilatura's ``tests/eval_common.py`` (``count_item``): each ``with``
  segment found in the output (substring, after collapsing whitespace runs to one space on both
  sides) is a TP, else a FN; each ``without`` segment found is a FP, else a TN; P, R, accuracy
  and F1 = 2TP / (2TP + FP + FN) over all pages pooled;
- ``article_extraction_benchmark``: 127 of scrapinghub's 181 pages with the true article body.
  Metric as its ``evaluate.py``: word 4-gram shingles (``\\w+`` tokens) of truth and output,
  TP/FP/FN as multiset overlaps, normalised per page; P = mean over pages with TP+FP > 0, R =
  mean over pages with TP+FN > 0, F1 = 2PR/(P+R); accuracy = share of pages whose token lists
  are equal.

Pages are decoded to text as our HTML reader does (``io.html.decode_html``) and given to both
sides without a URL, as the peers' own runners do. For each extractor (trafilatura precision
[the stage's default, as FineWeb], balanced [trafilatura's default], fast; resiliparse when
installed):

- ours: ``process_batch(Extract(...), batch)`` over batches of the stage's ``batch_size`` (32),
  extraction in the sandbox child (started and warmed before timing; start-up printed apart);
- direct: ``trafilatura.bare_extraction`` (or resiliparse ``extract_plain_text``) in a loop with
  the same settings, after the same warm-up page. The two alternate batch by batch so a shared
  machine's load falls on both; the default extractor gets 3 passes and each side's best counts.

The texts must be identical page for page (``BENCH extraction_<set>_same_output``, all
extractors), and the default stage must run at >= 0.9x the direct loop's docs/s
(``BENCH extraction_<set>_throughput``). Two more rows measure what metadata (title, date:
``metadata: true``, trafilatura's ``with_metadata=True``) costs: the default stage with it, and a
bare ``trafilatura.extract(html)`` call (the library's defaults: balanced, comments and tables
kept, no metadata) timed alongside; no target, a measurement. Published figures (trafilatura's
docs/evaluation.rst, other page counts, other machines) are printed beside ours for context.
``--quick``: 60 pages of each set, the default extractor and resiliparse only; full: every page,
also balanced and fast modes.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from dataflywheel.filters.extract import WARMUP_HTML, Extract
from dataflywheel.io.html import decode_html
from dataflywheel.stages import batches, process_batch

DATA = Path(os.environ.get("DATAFLYWHEEL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TRAF_EVAL, ARTICLES = DATA / "trafilatura_eval", DATA / "article_extraction_benchmark"
DEFAULT = ("trafilatura", "precision")  # the stage's default config: the throughput claim
TARGET = 0.9  # the sandboxed stage within 10% of calling the extractor directly

# trafilatura docs/evaluation.rst (990 pages, 2026-08-04): P, R, accuracy, F1.
PEER_TRAF_EVAL = {"trafilatura/balanced": (0.906, 0.943, 0.923, 0.924), "trafilatura/precision": (0.925, 0.915, 0.921, 0.920),
                  "trafilatura/fast": (0.907, 0.930, 0.917, 0.918), "resiliparse": (0.705, 0.955, 0.778, 0.811)}
# scrapinghub/article-extraction-benchmark README, latest evaluation (181 pages): trafilatura 2.0.0.
PEER_ARTICLES = {"trafilatura/balanced": (0.938, 0.978, 0.293, 0.958)}
# trafilatura 2.3.1 pages/s on 100 synthetic 14 KB pages, measured on this machine type (2 cores).
PEER_RATE = {"trafilatura/balanced": 96, "trafilatura/precision": 214, "trafilatura/fast": 340}


# -- metrics ----------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def segment_scores(items: list[dict], outputs: list[str]) -> tuple[float, float, float, float]:
    """trafilatura eval: P, R, accuracy, F1 from pooled with/without segment counts."""
    tp = fp = fn = tn = 0
    for item, out in zip(items, outputs):
        res = _norm(out)
        hit = sum(_norm(w) in res for w in item["with"])
        bad = sum(_norm(w) in res for w in item["without"])
        tp, fn, fp, tn = tp + hit, fn + len(item["with"]) - hit, fp + bad, tn + len(item["without"]) - bad
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    acc = (tp + tn) / (tp + tn + fp + fn) if tp + tn + fp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return p, r, acc, f1


_TOKEN = re.compile(r"\w+", re.UNICODE)


def _shingles(text: str, n: int = 4) -> Counter:
    tokens = _TOKEN.findall(text or "")
    return Counter(tuple(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1)) if tokens[i:i + n])


def shingle_scores(truths: list[str], outputs: list[str]) -> tuple[float, float, float, float]:
    """scrapinghub article benchmark: P, R, accuracy, F1 (per-page normalised 4-gram shingles)."""
    precisions, recalls, exact = [], [], []
    for true, pred in zip(truths, outputs):
        t, p = _shingles(true), _shingles(pred)
        tp = sum(min(t[k], p[k]) for k in t.keys() | p.keys())
        fp = sum(max(0, p[k] - t[k]) for k in t.keys() | p.keys())
        fn = sum(max(0, t[k] - p[k]) for k in t.keys() | p.keys())
        total = tp + fp + fn
        tp, fp, fn = (tp / total, fp / total, fn / total) if total else (0.0, 0.0, 0.0)
        if tp + fp > 0:
            precisions.append(1.0 if fp == fn == 0 else tp / (tp + fp))
        if tp + fn > 0:
            recalls.append(1.0 if fp == fn == 0 else tp / (tp + fn))
        exact.append(float(_TOKEN.findall(true or "") == _TOKEN.findall(pred or "")))
    p, r = statistics.mean(precisions), statistics.mean(recalls)
    return p, r, statistics.mean(exact), 2 * p * r / (p + r) if p + r else 0.0


# -- data -------------------------------------------------------------------------------------
def _sample(keys: list[str], n: int | None) -> list[str]:
    if n is None or n >= len(keys):
        return keys
    step = len(keys) / n  # evenly spread over the sorted keys: deterministic, not the first n
    return [keys[int(i * step)] for i in range(n)]


def load_traf_eval(n: int | None) -> tuple[list[dict], list[dict]]:
    expectations = json.loads((TRAF_EVAL / "expectations.json").read_text(encoding="utf-8"))
    rows, items = [], []
    for key in _sample(sorted(expectations), n):
        item = expectations[key]
        html, _ = decode_html(gzip.decompress((TRAF_EVAL / "html" / f"{item['file']}.gz").read_bytes()))
        rows.append({"id": item["file"], "html": html})
        items.append(item)
    return rows, items


def load_articles(n: int | None) -> tuple[list[dict], list[str]]:
    truth = json.loads((ARTICLES / "ground-truth.json").read_text(encoding="utf-8"))
    rows, bodies = [], []
    for key in _sample(sorted(truth), n):
        html, _ = decode_html(gzip.decompress((ARTICLES / "html" / f"{key}.html.gz").read_bytes()))
        rows.append({"id": key, "html": html})
        bodies.append(truth[key].get("articleBody", ""))
    return rows, bodies


# -- runs -------------------------------------------------------------------------------------
def direct_call(backend: str, mode: str, metadata: bool = False):
    """The peer: the library called in a loop with the stage's settings (no stage, no sandbox)."""
    if backend == "resiliparse":
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.html import HTMLTree

        return lambda html: (extract_plain_text(HTMLTree.parse(html), main_content=True, comments=False) or "").strip()
    import trafilatura

    def call(html: str) -> str:
        doc = trafilatura.bare_extraction(html, with_metadata=metadata, include_comments=False, include_tables=True,
                                          favor_precision=mode == "precision", favor_recall=mode == "recall",
                                          fast=mode == "fast")
        return ((doc.text if doc is not None else None) or "").strip()

    return call


def bare_extract(html: str) -> str:
    """``trafilatura.extract`` with the library's defaults: the reference for what metadata costs."""
    import trafilatura

    return trafilatura.extract(html) or ""


def run_pair(rows: list[dict], backend: str, mode: str, sandbox: bool = True, repeats: int = 1,
             metadata: bool = False, alongside=None) -> dict:
    """Texts of both sides (first pass) and docs/s, best of ``repeats`` passes per side: on a shared
    machine the fastest pass is the one least disturbed by other work. ``alongside``: one more
    function timed on the same batches (its docs/s is ``alongside_rate``)."""
    stage = Extract(backend=backend, mode=mode, sandbox=sandbox, metadata=metadata)
    start = time.perf_counter()
    stage.setup()
    process_batch(stage, [{"id": "warm", "html": "<p>warm</p>"}])  # waits until the child is ready
    startup = time.perf_counter() - start
    direct = direct_call(backend, mode, metadata)
    direct(WARMUP_HTML)  # the same one-time warm-up the stage's child does (dateparser locales)
    if alongside is not None:
        alongside(WARMUP_HTML)
    ours_text: dict[str, str] = {}
    direct_text: list[str] = []
    ours_rates, direct_rates, alongside_rates = [], [], []
    try:
        for rep in range(repeats):
            ours_t = direct_t = alongside_t = 0.0
            for k, batch in enumerate(batches(rows, stage.config.batch_size)):
                if alongside is not None:
                    t = time.perf_counter()
                    for r in batch:
                        alongside(r["html"])
                    alongside_t += time.perf_counter() - t
                for side in ((0, 1) if k % 2 == 0 else (1, 0)):  # alternate who goes first
                    t = time.perf_counter()
                    if side == 0:
                        out = process_batch(stage, batch)
                        ours_t += time.perf_counter() - t
                        if rep == 0:
                            collect(out, ours_text)
                    else:
                        texts = [direct(r["html"]) for r in batch]
                        direct_t += time.perf_counter() - t
                        if rep == 0:
                            direct_text.extend(texts)
            ours_rates.append(len(rows) / ours_t)
            direct_rates.append(len(rows) / direct_t)
            alongside_rates.append(len(rows) / alongside_t if alongside_t else 0.0)
    finally:
        stage.teardown()
    ours = [ours_text[r["id"]] for r in rows]
    return {"ours": ours, "direct": direct_text, "ours_rate": max(ours_rates), "direct_rate": max(direct_rates),
            "ratio": max(ours_rates) / max(direct_rates), "alongside_rate": max(alongside_rates),
            "startup": startup, "same": ours == direct_text, "name": stage.extractor_name}


def collect(out, texts: dict[str, str]) -> None:
    """The stage's text per page id; a rejected or dead page counts as empty output."""
    for r in out.kept:
        texts[r["id"]] = r["text"]
    for r in out.rejected:
        texts[r["id"]] = ""
        if r["rejected"]["reason"] != "no_text":
            print(f"  note: {r['id']} rejected {r['rejected']['reason']}")
    for r in out.dead:
        texts[r["record"]["id"]] = ""
        print(f"  note: {r['record']['id']} dead letter: {r['detail']}")


def bench_set(label: str, rows: list[dict], score, extractors: list[tuple[str, str]], peers: dict, quick: bool,
              repeats: int) -> bool:
    print(f"\n== {label}: {len(rows)} pages, {sum(len(r['html']) for r in rows) / len(rows) / 1000:.0f} kB of HTML on average")
    head = f"{'extractor':<22}{'P':>7}{'R':>7}{'acc':>7}{'F1':>7}  {'published P/R/acc/F1':<26}{'same':>6}"
    print(head + f"{'ours doc/s':>11}{'direct':>9}{'ratio':>7}{'start s':>8}")
    results = {}
    for backend, mode in extractors:
        res = run_pair(rows, backend, mode, repeats=repeats if (backend, mode) == DEFAULT else 1)
        results[res["name"]] = res
        ours_q, direct_q = score(res["ours"]), score(res["direct"])
        peer = peers.get(res["name"])
        peer_s = "/".join(f"{x:.3f}" for x in peer) if peer else "-"
        print(f"{res['name']:<22}" + "".join(f"{x:>7.3f}" for x in ours_q) + f"  {peer_s:<26}{'yes' if res['same'] else 'NO':>6}"
              f"{res['ours_rate']:>11.1f}{res['direct_rate']:>9.1f}{res['ratio']:>7.2f}"
              f"{res['startup']:>8.2f}")
        if not res["same"]:
            diff = sum(a != b for a, b in zip(res["ours"], res["direct"]))
            print(f"  {diff} pages differ; direct-call quality: " + " ".join(f"{x:.3f}" for x in direct_q))
        res["quality"], res["direct_quality"] = ours_q, direct_q
    base = results["/".join(DEFAULT)]
    inproc = run_pair(rows, *DEFAULT, sandbox=False)
    print(f"{'(stage, sandbox off)':<22}{'':>28}  {'':<26}{'yes' if inproc['same'] else 'NO':>6}"
          f"{inproc['ours_rate']:>11.1f}{inproc['direct_rate']:>9.1f}{inproc['ratio']:>7.2f}")
    meta = run_pair(rows, *DEFAULT, metadata=True, alongside=bare_extract, repeats=repeats)
    print(f"{'(stage, metadata on)':<22}" + "".join(f"{x:>7.3f}" for x in score(meta["ours"]))
          + f"  {'':<26}{'yes' if meta['same'] else 'NO':>6}"
          f"{meta['ours_rate']:>11.1f}{meta['direct_rate']:>9.1f}{meta['ratio']:>7.2f}")
    print(f"{'trafilatura.extract()':<22}{'':>28}  {'(library defaults)':<26}{'':>6}{'':>11}"
          f"{meta['alongside_rate']:>9.1f}")
    print(f"metadata on: the stage at {meta['ours_rate']:.1f} docs/s = {meta['ours_rate'] / base['ours_rate']:.2f}x "
          f"itself without metadata ({base['ours_rate']:.1f}), "
          f"{meta['ours_rate'] / meta['alongside_rate']:.2f}x a bare trafilatura.extract() call "
          f"({meta['alongside_rate']:.1f}); without metadata {base['ours_rate'] / meta['alongside_rate']:.2f}x "
          f"(the bare call's rate is from the metadata pass)")
    print("published trafilatura pages/s on synthetic pages: "
          + ", ".join(f"{k.split('/')[1]} ~{v}" for k, v in PEER_RATE.items()))
    size = f"_{len(rows)}p" if quick else ""
    same = all(r["same"] for r in results.values()) and meta["same"]
    f1, peer_f1 = base["quality"][3], base["direct_quality"][3]
    print(f"BENCH extraction_{label}_same_output{size} ours={f1:.4f} peer={peer_f1:.4f} ratio={f1 / peer_f1 if peer_f1 else 0:.3f} "
          f"target==1 {'PASS' if same else 'FAIL'}")
    ratio = base["ratio"]
    print(f"BENCH extraction_{label}_throughput{size} ours={base['ours_rate']:.1f} peer={base['direct_rate']:.1f} "
          f"ratio={ratio:.2f} target>={TARGET} {'PASS' if ratio >= TARGET else 'FAIL'}")
    return same and ratio >= TARGET


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 pages of each set")
    ap.add_argument("--pages", type=int, default=None, help="pages per set (default: all, or 60 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes of the default extractor (default 3)")
    args = ap.parse_args()
    if not TRAF_EVAL.is_dir() or not ARTICLES.is_dir():
        print(f"SKIP extraction: {TRAF_EVAL} or {ARTICLES} not found")
        return 0
    n = args.pages or (60 if args.quick else None)
    repeats = args.repeats or 3
    # --quick checks the default and resiliparse; the other modes only change quality (full run)
    extractors = [DEFAULT] if args.quick else [DEFAULT, ("trafilatura", "balanced"), ("trafilatura", "fast")]
    if importlib.util.find_spec("resiliparse") is not None:
        extractors.append(("resiliparse", "balanced"))
    else:
        print("resiliparse not installed (pip install 'dataflywheel[extract]'): its rows are left out")
    rows, items = load_traf_eval(n)
    bench_set("trafilatura_eval", rows, lambda outs: segment_scores(items, outs), extractors, PEER_TRAF_EVAL, args.quick, repeats)
    rows, bodies = load_articles(n)
    bench_set("article_benchmark", rows, lambda outs: shingle_scores(bodies, outs), extractors, PEER_ARTICLES, args.quick, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
