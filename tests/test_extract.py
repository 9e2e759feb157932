"""The extract stage: killable sandbox (real hangs, real crashes), backends, meta, engines.

The misbehaving pages are real: ``probe_backend`` below is a documented ``module:function``
backend (``backend: test_extract:probe_backend``) that the sandbox's child imports itself; it
really spins, sleeps or exits on marked pages and hands every other page to trafilatura. A second
test makes real trafilatura slow with a large page and a small CPU limit.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

import pytest

from dataflywheel.errors import UserError
from dataflywheel.filters import extract_backends
from dataflywheel.filters.extract import WARMUP_HTML, Extract
from dataflywheel.stages import process_batch

# The sandbox's child imports this module for probe_backend: heavy imports (Beam, config) stay
# inside the tests that need them, so each respawn costs an interpreter start, not a Beam import.

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "dataflywheel" / "data" / "demo" / "pages").glob("*.html"))
PROBE = "test_extract:probe_backend"
pytestmark = pytest.mark.timeout(120)  # a sandbox that fails to kill a hang fails here, not at 600 s


def probe_backend(html: str, url: str | None, **settings) -> dict | None:
    """Test backend: misbehaves on marked pages, else trafilatura (runs in the sandbox's child)."""
    if html == WARMUP_HTML:  # a lighter start-up warm-up: these tests never reach dateparser (~2 s to set up)
        html = "<html><body><article><p>warm up</p></article></body></html>"
    if "PROBE-SPIN" in html:
        while True:  # a CPU-bound hang, like trafilatura#704
            pass
    if "PROBE-SLEEP" in html:
        time.sleep(3600)  # a hang that uses no CPU: only the wall-clock cap catches it
    if "PROBE-EXIT" in html:
        os._exit(3)  # the child dies mid-page, as on a segfault or an OOM kill
    if "PROBE-RAISE" in html:
        raise ValueError("probe raised")
    return extract_backends.trafilatura_backend(html, url, **settings)


def article(i: int) -> dict:
    words = " ".join(f"word{i}x{j}" for j in range(80))
    html = (f"<html><head><title>Page {i}</title></head><body><nav>Home | About</nav><article>"
            f"<h1>Page {i}</h1><p>This is article number {i}. {words}.</p>"
            f"<p>A second paragraph of article {i} says more about the topic at hand.</p></article></body></html>")
    return {"id": f"p{i}", "url": f"https://example.org/{i}", "html": html}


def marked(marker: str, i: int) -> dict:
    row = article(i)
    return {**row, "id": marker, "html": row["html"].replace("<article>", f"<article><!-- {marker} -->")}


def demo_rows() -> list[dict]:
    return [{"id": p.stem, "url": f"https://example.org/{p.stem}", "html": p.read_text(encoding="utf-8")}
            for p in PAGES]


def by_id(rows: list[dict]) -> dict:
    return {r["id"]: r for r in rows}


def test_hangs_and_crashes_cost_only_their_page():
    stage = Extract(backend=PROBE, timeout_s=0.3)
    stage.setup()
    try:
        rows = [article(0), marked("PROBE-SPIN", 1), article(2), marked("PROBE-EXIT", 3), article(4),
                marked("PROBE-RAISE", 5), article(6)]
        first_pid = stage._sandbox.pid
        start = time.perf_counter()
        out = process_batch(stage, rows)
        took = time.perf_counter() - start
        kept, rejected = by_id(out.kept), by_id(out.rejected)
        assert sorted(kept) == ["p0", "p2", "p4", "p6"]  # the pages after each failure still extracted
        for i in (0, 2, 4, 6):
            assert f"This is article number {i}." in kept[f"p{i}"]["text"]
            assert "html" not in kept[f"p{i}"]
        assert rejected["PROBE-SPIN"]["rejected"]["reason"] == "timeout"
        assert rejected["PROBE-EXIT"]["rejected"]["reason"] == "extractor_crashed"
        assert "code 3" in rejected["PROBE-EXIT"]["meta"]["extract_error_detail"]
        assert all(r["html"] for r in rejected.values())  # kept for a retry with other settings
        assert len(out.dead) == 1 and out.dead[0]["record"]["id"] == "PROBE-RAISE"
        assert "probe raised" in out.dead[0]["detail"]
        assert stage._sandbox.restarts == 2 and stage._sandbox.pid != first_pid
        assert took < 20, took  # the spinning page was cut at its limit, not waited out
    finally:
        stage.teardown()


def test_blocked_page_hits_the_wall_clock_cap():
    stage = Extract(backend=PROBE, timeout_s=0.1)  # CPU limit 0.1 s; a sleeper is cut at 10x in wall time
    try:
        start = time.perf_counter()
        out = process_batch(stage, [marked("PROBE-SLEEP", 0), article(1)])
        assert time.perf_counter() - start < 15
        assert [r["rejected"]["reason"] for r in out.rejected] == ["timeout"]
        assert "wall time" in out.rejected[0]["meta"]["extract_error_detail"]
        assert [r["id"] for r in out.kept] == ["p1"]
    finally:
        stage.teardown()


def test_real_trafilatura_on_a_slow_page_is_killed_and_the_next_page_extracted():
    body = "".join(f"<div class='c{i % 7}'><p>Paragraph {i} about bicycles, chains and gears.</p>"
                   f"<a href='/x{i}'>link {i}</a></div>" for i in range(3000))  # ~0.8 s of trafilatura CPU
    big = {"id": "big", "html": f"<html><body>{body}</body></html>"}
    stage = Extract(timeout_s=0.15)
    try:
        out = process_batch(stage, [big, article(1), article(2)])
        assert [r["rejected"]["reason"] for r in out.rejected] == ["timeout"]
        assert [r["id"] for r in out.kept] == ["p1", "p2"]
        assert "over 0.15 s of CPU" in out.rejected[0]["meta"]["extract_error_detail"]
    finally:
        stage.teardown()


def test_sandbox_matches_in_process_and_records_meta():
    rows = demo_rows()
    boxed, plain = Extract(metadata=True), Extract(metadata=True, sandbox=False)
    try:
        a, b = process_batch(boxed, rows), process_batch(plain, rows)
    finally:
        boxed.teardown()
    assert plain._sandbox is None and "_sandbox" not in boxed.__dict__  # teardown released the child
    assert len(a.kept) >= 5 and [r["text"] for r in a.kept] == [r["text"] for r in b.kept]
    assert [r["id"] for r in a.rejected] == [r["id"] for r in b.rejected]
    for row in a.kept:
        meta = row["meta"]
        assert meta["extractor"] == "trafilatura/precision" and meta["url"] == row["url"] and meta["title"]
    assert any(r["meta"].get("date") for r in a.kept)


def test_too_large_is_rejected_before_the_child_sees_it():
    stage = Extract(backend=PROBE, max_html_bytes=2000)
    try:
        huge = marked("PROBE-EXIT", 0)  # would kill the child if it were sent
        huge["html"] += "x" * 3000
        out = process_batch(stage, [huge, article(1)])
        assert [r["rejected"]["reason"] for r in out.rejected] == ["too_large"]
        assert stage._sandbox.restarts == 0 and [r["id"] for r in out.kept] == ["p1"]
    finally:
        stage.teardown()


def test_teardown_stops_the_child_and_pickling_drops_it():
    stage = Extract()
    stage.setup()
    pid = stage._sandbox.pid
    clone = pickle.loads(pickle.dumps(stage))  # what Beam does with a stage in a DoFn
    assert clone.config == stage.config and not {"_backend", "_sandbox"} & set(clone.__dict__)
    assert process_batch(stage, [article(0)]).kept
    stage.teardown()
    assert not {"_backend", "_sandbox"} & set(stage.__dict__)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_resources_are_built_on_first_use_and_again_after_teardown():
    stage = Extract(sandbox=False)
    assert not {"_backend", "_sandbox"} & set(stage.__dict__)  # nothing built by the constructor
    assert [r["id"] for r in process_batch(stage, [article(0)]).kept] == ["p0"]  # built lazily, no setup()
    assert stage._sandbox is None and callable(stage.__dict__["_backend"])
    stage.teardown()
    assert "_backend" not in stage.__dict__
    assert process_batch(stage, [article(1)]).kept  # a torn-down stage builds again when used


JS_ONLY = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>App</title></head><body><div id='root'></div>"
           "<noscript>You need to enable JavaScript to run this app.</noscript>"
           "<script>window.__DATA__ = {\"items\": [1, 2, 3]};</script><script src='/static/js/main.js'></script>"
           "</body></html>")


def test_a_bare_extract_stage_runs_precision_mode(tmp_path):
    from dataflywheel.pipelines.config import parse_config

    run = parse_config({"input": {"paths": str(tmp_path / "*.jsonl")}, "output": {"path": str(tmp_path / "o")},
                        "stages": [{"stage": "extract"}]}, "<test>")
    (stage,) = run.jobs[0].build_stages()
    assert isinstance(stage, Extract) and stage.config.mode == "precision" and not stage.config.metadata
    stage = Extract(sandbox=False)
    page = {"id": "js", "url": "https://example.org/app", "html": JS_ONLY}
    out = process_batch(stage, [page, article(0)])
    # precision mode drops the <noscript> notice that balanced mode keeps as the page's text
    assert [(r["id"], r["rejected"]["reason"]) for r in out.rejected] == [("js", "no_text")]
    assert out.kept[0]["meta"]["extractor"] == "trafilatura/precision"
    balanced = process_batch(Extract(mode="balanced", sandbox=False), [page])
    assert [r["text"] for r in balanced.kept] == ["You need to enable JavaScript to run this app."]


def test_bad_inputs_javascript_only_page_is_rejected_by_default(shared_data):
    html = (shared_data / "bad_inputs" / "html" / "javascript_only.html").read_text(encoding="utf-8")
    out = process_batch(Extract(sandbox=False), [{"id": "js", "html": html}])
    assert out.kept == [] and [r["rejected"]["reason"] for r in out.rejected] == ["no_text"]


def test_web_pipeline_extracts_in_precision_mode():
    from dataflywheel.pipelines.web import load_web_config

    stages = load_web_config(REPO / "configs" / "web.yaml").jobs[0].build_stages()
    (extract,) = [s for s in stages if isinstance(s, Extract)]
    assert extract.config.mode == "precision"


def test_title_and_date_only_with_metadata():
    rows = demo_rows()
    bare, with_meta = Extract(sandbox=False), Extract(sandbox=False, metadata=True)
    a, b = process_batch(bare, rows), process_batch(with_meta, rows)
    assert [r["text"] for r in a.kept] == [r["text"] for r in b.kept]  # the same text either way
    assert not any("title" in r["meta"] or "date" in r["meta"] for r in a.kept)
    assert all(r["meta"]["title"] for r in b.kept) and any(r["meta"].get("date") for r in b.kept)


def test_resiliparse_backend():
    pytest.importorskip("resiliparse")
    stage = Extract(backend="resiliparse", sandbox=False, metadata=True)
    out = process_batch(stage, [article(3)])
    row = out.kept[0]
    assert "This is article number 3." in row["text"] and "Home | About" not in row["text"]
    assert row["meta"]["title"] == "Page 3" and row["meta"]["extractor"] == "resiliparse"


def test_missing_resiliparse_names_the_extra(monkeypatch, tmp_path):
    from dataflywheel.pipelines.config import parse_config

    monkeypatch.setattr(extract_backends, "_installed", lambda name: name != "resiliparse")
    cfg = {"input": {"paths": str(tmp_path / "*.jsonl")}, "output": {"path": str(tmp_path / "o")},
           "stages": [{"stage": "extract", "backend": "resiliparse"}]}
    with pytest.raises(UserError, match=r"'extract' extra.*resiliparse==2\.0\.1"):
        parse_config(cfg, "<test>")
    monkeypatch.setitem(sys.modules, "resiliparse.extract.html2text", None)  # its import now fails
    with pytest.raises(UserError, match="'extract' extra"):
        extract_backends.resolve_backend("resiliparse")


def test_bad_backend_specs_are_config_errors(tmp_path):
    from dataflywheel.pipelines.config import parse_config

    def stages(**extra):
        return {"input": {"paths": str(tmp_path / "*.jsonl")}, "output": {"path": str(tmp_path / "o")},
                "stages": [{"stage": "extract", **extra}]}

    with pytest.raises(UserError, match="unknown backend 'goose'"):
        parse_config(stages(backend="goose"), "<test>")
    with pytest.raises(UserError, match="cannot import extraction backend"):
        extract_backends.resolve_backend("no_such_module_xyz:extract")


def test_beam_engine_rejects_the_hanging_page(tmp_path):
    """Inside Beam's FnApiRunner worker threads: the child is started in setup() and the hang is cut."""
    from dataflywheel.pipelines.config import parse_config
    from dataflywheel.pipelines.job import run_job

    src = tmp_path / "in.jsonl"
    rows = [article(0), marked("PROBE-SPIN", 1), article(2)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "t", "runner": {"engine": "local"},
           "input": {"paths": str(src), "kind": "document"},
           "stages": [{"stage": "extract", "backend": PROBE, "timeout_s": 0.3}],
           "output": {"path": str(tmp_path / "out"), "format": "jsonl"}}
    run = parse_config(cfg, "<test>")
    report = run_job(run.jobs[0], run.runner)
    ext = next(s for s in report.stages if s.stage == "extract")
    assert ext.kept == 2 and ext.rejected == {"timeout": 1}
