"""Progress lines of long runs: the format, both engines, the CLI's --quiet, the flywheel's stage prefix."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml

from dataflywheel import progress
from dataflywheel.cli import main
from dataflywheel.flywheel.state import run_stage
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_run_line_shows_files_bytes_rows_rate_and_eta():
    clock = FakeClock()
    prog = progress.RunProgress(4, 4_000_000, label="job", clock=clock)
    clock.now += 5
    assert prog.line() == "job: files 0/4, 0 B/4.0 MB, 0 rows, 0 rows/s, ETA ?"
    prog.add(files=1, bytes=1_000_000, rows=500)
    clock.now += 5
    assert prog.line() == "job: files 1/4, 1.0 MB/4.0 MB, 500 rows, 50 rows/s, ETA 30s"
    prog.at_least(files=3, bytes=3_000_000, rows=400)  # another view (metrics, spool): the larger number wins
    assert prog.line() == "job: files 3/4, 3.0 MB/4.0 MB, 500 rows, 50 rows/s, ETA 3s"
    prog.add(files=1, bytes=1_000_000, rows=1_500)
    assert prog.line() == "job: files 3/4, 3.0 MB/4.0 MB, 2,000 rows, 200 rows/s, ETA 3s"
    prog.at_least(files=4, bytes=4_000_000)
    assert prog.line().endswith("200 rows/s, inputs read")
    clock.now += 190
    assert prog.line(final=True) == "job: files 4/4, 4.0 MB/4.0 MB, 2,000 rows, 10 rows/s, done in 3m20s"


def test_eta_by_files_when_sizes_are_unknown_and_units():
    clock = FakeClock()
    prog = progress.RunProgress(10, 0, clock=clock)
    prog.add(files=2, rows=7)
    clock.now += 60
    assert prog.line() == "files 2/10, 0 B/0 B, 7 rows, 0 rows/s, ETA 4m00s"
    assert [progress.human_bytes(n) for n in (999, 1_500, 2_500_000_000, 7e12, 3e15)] == [
        "999 B", "1.5 kB", "2.5 GB", "7.0 TB", "3000.0 TB"]
    assert [progress.human_duration(s) for s in (0.4, 59, 61, 3599, 3700, 90000)] == [
        "0s", "59s", "1m01s", "59m59s", "1h01m", "25h00m"]


def test_step_line():
    clock = FakeClock()
    steps = progress.StepProgress(40, start=10, label="round-001/train: sft", clock=clock)
    assert steps.line() == "round-001/train: sft: step 10/40, 0.00 steps/s, ETA ?"
    steps.step = 20
    clock.now += 8
    assert steps.line() == "round-001/train: sft: step 20/40, 1.25 steps/s, ETA 16s"
    assert steps.line(final=True).endswith("done in 8s")


def test_ticker_redraws_in_place_on_a_terminal_and_prints_lines_otherwise():
    term = io.StringIO()
    ticker = progress.Ticker(lambda: "", progress.Settings(tty=True, interval=3600, stream=term))
    ticker.show("files 1/2, long line")
    ticker.show("files 2/2")
    ticker.close("never shown on a terminal")
    assert term.getvalue() == "\rfiles 1/2, long line\rfiles 2/2" + " " * 11 + "\r" + " " * 9 + "\r"
    log = io.StringIO()
    ticker = progress.Ticker(lambda: "", progress.Settings(tty=False, interval=3600, stream=log)).start()
    ticker.show("files 1/2")
    ticker.close("files 2/2, done")
    assert log.getvalue() == "files 1/2\nfiles 2/2, done\n"


def test_reporter_finds_the_run_in_this_process_or_spools_for_other_processes(tmp_path):
    assert progress.reporter(None) is None
    with progress.configured(True, interval=3600, stream=io.StringIO()), progress.run([], "job") as prog:
        assert progress.reporter(prog.token) is prog
        folder = prog.spool_folder()
        worker = progress.reporter("a token of another process", folder)  # what a worker process sees
        assert worker is not None and worker is not prog
        worker.add(rows=5)  # the first add writes; later ones at most once a second
        worker.add(files=1, bytes=10, rows=3)
        worker.flush()
        progress.reporter("another worker", folder).add(rows=2)
        assert progress.read_spool(folder) == (1, 10, 10)
        prog.refresh()
        assert prog.counts() == (1, 10, 10)
    assert progress.reporter(prog.token, folder) is None  # the run is over and its spool removed
    assert progress.reporter("unknown", str(tmp_path / "not-here")) is None  # a remote worker


def write_inputs(folder: Path, files: int = 3, rows: int = 400) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in range(files):
        text = "".join(json.dumps({"id": f"{f}-{i}", "text": "word " * (i % 9)}) + "\n" for i in range(rows))
        total += len(text.encode())
        (folder / f"in-{f}.jsonl").write_text(text)
    return total


def job_config(tmp: Path, engine: str) -> dict:
    return {"name": "prog", "runner": {"engine": engine},
            "input": {"paths": [str(tmp / "in")], "kind": "document", "batch_rows": 50},
            "stages": [{"stage": "length", "min_words": 3}],
            "output": {"path": str(tmp / f"out-{engine}"), "format": "jsonl"}}


@pytest.mark.parametrize("engine", ["plain", "local"])
def test_a_run_prints_progress_with_the_totals_and_a_final_line(tmp_path, engine):
    size = progress.human_bytes(write_inputs(tmp_path / "in"))
    parsed = parse_config(job_config(tmp_path, engine), "<test>")
    out = io.StringIO()
    with progress.configured(True, interval=0.001, tty=False, stream=out):
        report = run_job(parsed.jobs[0], parsed.runner)
    lines = out.getvalue().splitlines()
    assert lines and all(re.match(rf"prog: files [0-3]/3, .*/{size}, [\d,]+ rows, [\d,]+ rows/s, ", li)
                         for li in lines), lines
    assert re.fullmatch(rf"prog: files 3/3, {size}/{size}, 1,200 rows, [\d,]+ rows/s, done in \d+s", lines[-1])
    assert report.stages[0].rows_in == 1200


@pytest.mark.parametrize("mode", ["in_process", "multi_processing"])
def test_local_beam_readers_report_to_the_launcher_while_running(tmp_path, monkeypatch, mode):
    """Without the committed metrics at the end, the counts come from the readers themselves: in this
    process (in_process), or through the spool folder (worker processes)."""
    from dataflywheel.pipelines import watch

    monkeypatch.setattr(watch, "finish", lambda *args: None)
    write_inputs(tmp_path / "in")
    cfg = job_config(tmp_path, "local")
    cfg["runner"].update(mode=mode, workers=2 if mode == "multi_processing" else 1)
    parsed = parse_config(cfg, "<test>")
    out = io.StringIO()
    with progress.configured(True, interval=3600, tty=False, stream=out):
        run_job(parsed.jobs[0], parsed.runner)
    assert re.fullmatch(r"prog: files 3/3, (.*)/\1, 1,200 rows, [\d,]+ rows/s, done in \d+s\n", out.getvalue())


def cli_config(tmp: Path) -> str:
    write_inputs(tmp / "in", files=2, rows=50)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job_config(tmp, "plain")))
    return str(path)


def test_cli_prints_progress_on_stderr_and_quiet_prints_none(tmp_path, capsys):
    config = cli_config(tmp_path)
    assert main(["run", config]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^prog: files 2/2, .* 100 rows, .*done in", err, re.M), err
    assert main(["run", config, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "files " not in captured.err and "rows/s" not in captured.err
    assert "kept rows in" in captured.out  # the report itself is still printed
    assert not progress._settings.enabled  # the command's setting ends with it


ROUND_ZERO = {  # the smallest flywheel: round 0 (seed, a few training steps, eval) of a tiny model
    "name": "tiny", "seed": 0, "rounds": 0,
    "task": {"seed_rows": 40, "eval_rows": 8, "width": 1, "seed_digits": [1, 1], "eval_digits": [1, 1]},
    "prompts": {"per_round": 12, "verifier": "regex_match"},
    "policy": {"tiny": {"hidden": 32, "layers": 1, "heads": 2, "vocab_size": 300, "split_digits": True},
               "steps": 6},
    "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 4},
    "scorers": [{"stage": "verify", "verifier": "regex_match", "options": {"pattern": "[0-9]"}}],
}


def test_flywheel_stage_lines_name_the_round_and_stage(tmp_path, capsys):
    def curate(out: Path) -> dict:  # a pipeline stage: a job run inside the stage
        parsed = parse_config({**job_config(tmp_path, "plain"), "output": {"path": str(out)}}, "<test>")
        run_job(parsed.jobs[0], parsed.runner)
        return {}

    write_inputs(tmp_path / "in", files=1, rows=20)
    logged: list[str] = []
    with progress.configured(True, tty=False):
        run_stage(tmp_path / "round-001", "curate", {"x": 1}, curate, log=logged.append)
    assert logged == ["round-001/curate: running"]
    assert re.search(r"^round-001/curate: prog: files 1/1, .*20 rows, .*done in", capsys.readouterr().err, re.M)

    path = tmp_path / "fw.yaml"  # a training stage through the command: its step line
    path.write_text(yaml.safe_dump({**ROUND_ZERO, "output": str(tmp_path / "run")}))
    assert main(["rounds", str(path)]) == 0
    captured = capsys.readouterr()
    assert "round-000/train: running" in captured.out
    assert re.search(r"^round-000/train: sft: step 6/6, [\d.]+ steps/s, done in", captured.err, re.M), captured.err
    assert "Loading weights" not in captured.err  # library bars are off in our commands
