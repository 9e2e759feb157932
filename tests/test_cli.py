"""The CLI as a user meets it: --help, one-line errors with exit 2, and the demo config end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dataflywheel.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0 and "run" in out.stdout and "validate" in out.stdout
    assert cli("run", "--help").returncode == 0


def test_user_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {paths: x.jsonl}\nstages: [{stage: nope}]\noutput: {path: o}\n")
    for args in (("run", str(bad)), ("run", str(tmp_path / "missing.yaml")), ("validate", str(bad))):
        out = cli(*args)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert out.stderr.startswith("dataflywheel: error: ")


def test_missing_input_files_are_a_user_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {{paths: {tmp_path}/none/*.jsonl}}\noutput: {{path: {tmp_path}/o}}\n")
    out = cli("run", str(cfg))
    assert out.returncode == 2 and "none/*.jsonl" in out.stderr and "Traceback" not in out.stderr


def test_stages_lists_builtins():
    out = cli("stages")
    assert out.returncode == 0
    for name in ("extract", "langid", "length", "exact_dedup"):
        assert name in out.stdout


def test_demo_config_end_to_end(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for job in cfg["jobs"]:
        if "curate" in job:  # a job naming a front-end config: output is a path, as curate's --output
            job["output"] = str(tmp_path / "web")
        else:
            job["output"]["path"] = str(tmp_path / job["name"])
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = cli("run", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rejected by reason" in out.stdout
    web = json.loads((tmp_path / "web" / "_report.json").read_text())
    stages = {s["stage"]: s for s in web["stages"]}
    assert stages["read"]["kept"] == 9
    assert stages["url_filter"]["rejected"] == {"domain_blocklist": 1}  # casino.html
    assert stages["extract"]["rejected"] == {"no_text": 1}  # nav-only.html
    assert stages["langid"]["rejected"] == {"language": 1}  # the German page
    assert stages["langid"]["stats"] == {"lang/en": 6, "lang/de": 1}
    assert stages["exact_dedup"]["rejected"] == {"duplicate": 1}
    assert stages["minhash_dedup"]["rejected"] == {"near_duplicate": 1}
    assert web["outputs"]["kept"]["rows"] == 3 and all(s["balanced"] for s in web["stages"])
    inst = json.loads((tmp_path / "instructions" / "_report.json").read_text())
    stages = {s["stage"]: s for s in inst["stages"]}
    assert stages["read"]["dead_letter"] == 3  # a malformed line, a 'bot' role, no final assistant
    assert stages["length"]["rejected"] == {"too_short": 1}
    assert stages["langid"]["rejected"] == {"language": 1}
    assert stages["exact_dedup"]["rejected"] == {"duplicate": 1}
    assert inst["outputs"]["kept"]["rows"] == 4


def test_train_commands_run_each_shipped_config_and_fail_in_one_line(tmp_path):
    for algo in ("sft", "rm", "dpo", "grpo"):
        out = cli("train", algo, f"configs/train_{algo}.yaml", "--output", str(tmp_path / algo), "--max-steps", "2")
        assert out.returncode == 0, (algo, out.stderr[-2000:])
        summary = json.loads((tmp_path / algo / "summary.json").read_text())
        assert summary["steps"] == 2 and (tmp_path / algo / "final" / "model.safetensors").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiny: {}\ndata: x.jsonl\noutput: o\nloop: {lr: -1}\n")
    out = cli("train", "sft", str(bad))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "loop.lr" in out.stderr
    bad.write_text(f"tiny: {{}}\ndata: {tmp_path / 'missing.jsonl'}\noutput: {tmp_path / 'o'}\n")
    out = cli("train", "sft", str(bad))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "missing.jsonl" in out.stderr


def test_validate_checks_every_shipped_config(monkeypatch, capsys):
    from dataflywheel.cli import main

    monkeypatch.chdir(REPO)
    for var in ("DATAFLOW_BUCKET", "DATAFLOW_IMAGE", "DATAFLOW_PROJECT", "PAIRS_POLICY", "PAIRS_RM", "SELECT_MODEL",
                "SYNTH_MODEL"):
        monkeypatch.setenv(var, "x")
    kinds = {"demo": "run", "web": "curate", "sft_select": "select", "pairs": "pairs", "synth": "synth",
             "flywheel": "rounds"}
    for name, kind in kinds.items():
        assert main(["validate", f"configs/{name}.yaml"]) == 0
        assert f"ok: a {kind} config" in capsys.readouterr().out
    for algo in ("sft", "rm", "dpo", "grpo"):
        assert main(["validate", "--as", f"train-{algo}", f"configs/train_{algo}.yaml"]) == 0
    assert main(["validate", "configs/train_sft.yaml"]) == 2  # a training config needs --as
    assert "pass --as" in capsys.readouterr().err


def test_help_and_stage_docs_cite_nothing_outside_the_repo():
    """Help text and `stages -v` name facts or docs/ pages, never documents a clone does not have."""
    import re

    texts = [cli("stages", "-v").stdout, cli("--help").stdout]
    texts += [cli(cmd, "--help").stdout for cmd in ("run", "curate", "select", "pairs", "synth", "train", "rounds",
                                                    "report", "export", "validate", "stages")]
    for text in texts:
        assert not re.search(r"DESIGN|REFERENCES|shared/|[Ii]ssue \d", text), text
