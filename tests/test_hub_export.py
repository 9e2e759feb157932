"""Hub export of real pipeline outputs (FnApiRunner), loaded back with ``datasets`` offline; the push
goes to a local HTTP server that records what huggingface_hub sends (no Hub is reachable here)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dataflywheel.cli import main
from dataflywheel.errors import UserError
from dataflywheel.io import read
from dataflywheel.io.commit import finalize_shards
from dataflywheel.io.hf import card_metadata
from dataflywheel.io.hub_export import export_dataset, push_to_hub, sources_from_paths

datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")

DEMO = Path(__file__).resolve().parents[1] / "dataflywheel" / "data" / "demo"
TOKEN = "hf_TestTokenNeverPrinted0123456789"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """Two real pipeline outputs: SFT conversations (Parquet, several shards) and preference pairs (JSONL.gz)."""
    root = tmp_path_factory.mktemp("pipeline")
    jobs = [
        {"name": "sft", "input": {"paths": str(DEMO / "sft_pool.jsonl"), "kind": "conversation"},
         "stages": [{"stage": "exact_dedup"}, {"stage": "minhash_dedup", "threshold": 0.8}],
         "output": {"path": str(root / "sft"), "format": "parquet", "rows_per_shard": 7}},
        {"name": "pairs", "input": {"paths": str(DEMO / "prefs.jsonl"), "kind": "preference"},
         "stages": [{"stage": "length", "min_words": 14}, {"stage": "exact_dedup"}],
         "output": {"path": str(root / "pairs"), "format": "jsonl.gz"}},
    ]
    cfg = root / "export.yaml"
    cfg.write_text(yaml.safe_dump({"name": "export", "runner": {"engine": "local"}, "jobs": jobs}))
    assert main(["run", str(cfg)]) == 0
    return {"sft": root / "sft", "pairs": root / "pairs"}


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


def success_rows(folder: Path, sub: str = "") -> int:
    return json.loads((folder / sub / "_SUCCESS.json").read_text())["rows"]


def load(folder: Path, config: str | None, tmp_path: Path):
    return datasets.load_dataset(str(folder), config, split="train", cache_dir=str(tmp_path / "c"))


def test_export_two_configs_loads_with_datasets(outputs, tmp_path: Path) -> None:
    out = tmp_path / "hub"
    prov = {"rounds": [{"round": 0, "accuracy": 0.25}, {"round": 1, "accuracy": 0.5}],
            "selection": {"method": "deita", "budget": 10}, "policy": "runs/r/round-1/policy"}
    info = export_dataset({"sft": str(outputs["sft"]), "pairs": str(outputs["pairs"])}, str(out),
                          name="Flywheel data", license="apache-2.0", provenance=prov, rows_per_shard=6)
    for config, folder in outputs.items():
        source = list(read(str(folder)))
        assert len(source) == success_rows(folder) > 0
        loaded = load(out, config, tmp_path)
        assert loaded.num_rows == len(source) == info["configs"][config]["rows"]
        assert set(loaded.column_names) == {k for row in source for k in row}
        assert [r["id"] for r in loaded] == [r["id"] for r in source]  # shard order kept
        files = sorted(p.relative_to(out).as_posix() for p in (out / config).iterdir())
        n = len(files)
        assert files == [f"{config}/train-{k:05d}-of-{n:05d}.parquet" for k in range(n)] == info["configs"][config]["files"]
        assert n == -(-len(source) // 6)
    pairs = load(out, "pairs", tmp_path)
    first = next(r for r in read(str(outputs["pairs"])))
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == (
        first["prompt"], first["chosen"], first["rejected"])
    assert load(out, None, tmp_path).num_rows == success_rows(outputs["sft"])  # the first config is the default
    meta = card_metadata(str(out))
    assert [c["config_name"] for c in meta["configs"]] == ["sft", "pairs"] and meta["configs"][0]["default"]
    assert meta["configs"][1]["data_files"] == [{"split": "train", "path": "pairs/train-*"}]
    assert meta["license"] == "apache-2.0" and meta["pretty_name"] == "Flywheel data"
    assert {"dataflywheel", "dpo", "sft"} <= set(meta["tags"]) and meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]
    card = (out / "README.md").read_text()
    assert info["configs"]["pairs"]["kind"] == "preference" and info["configs"]["sft"]["kind"] == "conversation"
    for folder in outputs.values():
        rejected = success_rows(folder, "_rejected")
        assert rejected > 0 and f"kept {success_rows(folder)}, rejected {rejected}, dead letter 0" in card
    assert "| minhash_dedup |" in card and "| length |" in card  # per-stage counts from _report.json
    assert "| 1 | 0.5 |" in card  # the rounds table
    block = card.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block) == prov
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_reexport_replaces_and_refusals(outputs, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "hub"
    export_dataset({"sft": str(outputs["sft"]), "pairs": str(outputs["pairs"])}, str(out))
    export_dataset({"only": str(outputs["pairs"])}, str(out), rows_per_shard=1000)  # an earlier export: replaced
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "only"]
    assert [c["config_name"] for c in card_metadata(str(out))["configs"]] == ["only"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export"):
        export_dataset({"sft": str(outputs["sft"])}, str(other))
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="overlaps the source"):
        export_dataset({"sft": str(outputs["sft"])}, str(outputs["sft"] / "hub"))
    with pytest.raises(UserError, match="invalid config name"):
        export_dataset({"a/b": str(outputs["sft"])}, str(tmp_path / "x"))
    # An empty source is left out and named; all empty, or rows that differ from _SUCCESS.json, are refused.
    finalize_shards(str(tmp_path / "empty"), "jsonl", [])  # what the sink writes for a job that kept nothing
    info = export_dataset({"sft": str(outputs["sft"]), "none": str(tmp_path / "empty")}, str(tmp_path / "e"))
    assert info["empty"] == ["none"] and list(info["configs"]) == ["sft"]
    assert "Not exported (no rows): `none`" in (tmp_path / "e" / "README.md").read_text()
    with pytest.raises(UserError, match="every source is empty"):
        export_dataset({"none": str(tmp_path / "empty")}, str(tmp_path / "e2"))
    changed = tmp_path / "changed"
    shutil.copytree(outputs["sft"], changed)
    marker = json.loads((changed / "_SUCCESS.json").read_text())
    (changed / "_SUCCESS.json").write_text(json.dumps({**marker, "rows": marker["rows"] + 1}))
    with pytest.raises(UserError, match="changed after the pipeline finished"):
        export_dataset({"sft": str(changed)}, str(tmp_path / "e3"))
    assert not (tmp_path / "e3").exists()
    # Secrets never reach the card: secret-looking keys are masked, the env token is scrubbed anywhere.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    export_dataset({"sft": str(outputs["sft"])}, str(tmp_path / "s"),
                   provenance={"hub_token": "abc123", "note": f"pushed with {TOKEN}"})
    card = (tmp_path / "s" / "README.md").read_text()
    assert TOKEN not in card and "abc123" not in card and "pushed with ***" in card


class RecordingHubServerForTests(ThreadingHTTPServer):
    """Stands in for the Hugging Face Hub, which is unreachable here: a real HTTP server on 127.0.0.1
    answering just what huggingface_hub's create_repo + upload_folder call (repos/create, validate-yaml,
    preupload with uploadMode "regular", the NDJSON commit, branch) and recording every request it gets."""

    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        srv: RecordingHubServerForTests = self.server  # type: ignore[assignment]
        body, path = self._body(), self.path.split("?")[0]
        srv.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            url = f"{srv.url}/datasets/{repo}"
            if repo in srv.repos:  # the Hub's answer names the existing repo, which exist_ok returns
                return self._send(409, {"error": "You already created this dataset repo", "url": url})
            srv.repos[repo] = req
            return self._send(200, {"url": url})
        if path == "/api/validate-yaml":  # the README's front matter, checked before the upload
            card = json.loads(body)["content"]
            yaml.safe_load(card.split("---\n")[1])
            return self._send(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if not match or match.group(1) not in srv.repos:
            return self._send(404, {"error": "Repository not found"})
        repo, action = match.group(1), match.group(2)
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if action == "branch":
            return self._send(200, {})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        for item in lines[1:]:
            assert item["key"] == "file" and item["value"]["encoding"] == "base64", item
            srv.files.setdefault(repo, {})[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        return self._send(200, {"commitUrl": f"{srv.url}/datasets/{repo}/commit/{oid}", "commitOid": oid,
                                "pullRequestUrl": None})


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the "Hub" is our local server
    server = RecordingHubServerForTests()
    yield server
    server.shutdown()
    server.server_close()


def exported_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_to_recording_server(outputs, tmp_path: Path, hub, monkeypatch, capfd, caplog) -> None:
    out = tmp_path / "hub"
    export_dataset({"sft": str(outputs["sft"]), "pairs": str(outputs["pairs"])}, str(out), rows_per_shard=6)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    huggingface_hub.utils.logging.set_verbosity_debug()
    caplog.set_level(logging.DEBUG)
    try:
        url = push_to_hub(str(out), "org/flywheel", endpoint=hub.url)
    finally:
        huggingface_hub.utils.logging.set_verbosity_warning()
    assert url == f"{hub.url}/datasets/org/flywheel"
    assert hub.repos["org/flywheel"]["type"] == "dataset" and hub.repos["org/flywheel"]["visibility"] == "private"
    sent = exported_files(out)
    assert len(sent) > 3 and hub.files["org/flywheel"] == sent  # every file, byte for byte
    assert hub.requests and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text

    # An explicit token wins over HF_TOKEN; exist_ok: a second push to the same repo works; --public flips it.
    push_to_hub(str(out), "org/open", endpoint=hub.url, private=False, token="hf_other_token_1234")
    assert hub.repos["org/open"]["visibility"] == "public"
    assert hub.requests[-1]["headers"]["authorization"] == "Bearer hf_other_token_1234"
    push_to_hub(str(out), "org/open", endpoint=hub.url, revision="round-2")
    assert any("/branch/round-2" in r["path"] for r in hub.requests)


def test_push_errors(tmp_path: Path, outputs, monkeypatch, hub) -> None:
    out = tmp_path / "hub"
    export_dataset({"sft": str(outputs["sft"])}, str(out))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no saved login either
    with pytest.raises(UserError, match="no Hugging Face token"):
        push_to_hub(str(out), "org/x", endpoint=hub.url)
    with pytest.raises(UserError, match="export it first"):
        push_to_hub(str(outputs["sft"]), "org/x", endpoint=hub.url, token=TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        push_to_hub(str(out), "org/x", endpoint=hub.url, token=TOKEN)


def test_cli_dataset_folders_and_push(outputs, tmp_path: Path, hub, monkeypatch, capfd) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "cli"
    code = main(["export", str(outputs["sft"]), str(outputs["pairs"]), "--to", str(out), "--config-name", "chat",
                 "prefs", "--push-to-hub", "me/data", "--endpoint", hub.url, "--public"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert [c["config_name"] for c in card_metadata(str(out))["configs"]] == ["chat", "prefs"]
    assert load(out, "prefs", tmp_path).num_rows == success_rows(outputs["pairs"])
    assert hub.files["me/data"] == exported_files(out) and hub.repos["me/data"]["visibility"] == "public"
    assert "pushed to" in captured.out and TOKEN not in captured.out + captured.err


def test_cli_run_folder_manifest(outputs, tmp_path: Path, capfd) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "rounds": [],  # the rest of a flywheel manifest is not read
        "exports": {"sft": str(outputs["sft"]), "pairs": str(outputs["pairs"])},  # relative to the run: absolute ok
        "card": {"rounds": 3, "policy_ids": ["p0", "p1", "p2"], "selection": {"method": "random", "budget": 8}},
    }))
    out = tmp_path / "from-run"
    assert main(["export", str(run), "--to", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert [c["config_name"] for c in card_metadata(str(out))["configs"]] == ["sft", "pairs"]
    assert '"policy_ids": [' in card and "- **rounds**: 3" in card
    assert load(out, "sft", tmp_path).num_rows == success_rows(outputs["sft"])
    # --config-name picks exports of a run; relative export paths resolve against the run folder.
    (run / "manifest.json").write_text(json.dumps({"exports": {"p": os.path.relpath(outputs["pairs"], run)}}))
    sources, prov = sources_from_paths([str(run)], ["p"])
    assert list(sources) == ["p"] and prov is None
    assert main(["export", str(run), "--to", str(tmp_path / "p"), "--config-name", "p"]) == 0
    capfd.readouterr()
    assert main(["export", str(run), "--to", str(tmp_path / "q"), "--config-name", "nope"]) == 2
    err = capfd.readouterr().err
    assert "no export 'nope' in the run manifest; exports: p" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case, message", [
    ("missing", "no such dataset folder"),
    ("no_success", "no _SUCCESS.json: not a finished pipeline output"),
    ("no_exports", 'no "exports"'),
])
def test_cli_bad_input(case, message, outputs, tmp_path: Path, capfd) -> None:
    folder = tmp_path / "in"
    if case == "no_success":
        folder.mkdir()
        (folder / "part-00000-of-00001.jsonl").write_text('{"id": "1", "text": "hi"}\n')
    elif case == "no_exports":
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"rounds": []}))
    assert main(["export", str(folder), "--to", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
