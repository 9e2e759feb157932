"""``transformers serve`` on a free loopback port, serving a local model folder: the real
OpenAI-compatible server the OpenAI backend is tested against."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Healthy after ~9 s alone for a tiny model (transformers 5.23); the suite shares 2 cores, and a
# 135M model takes longer to load.
SERVE_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def transformers_serve(folder: Path | str, root: Path) -> Iterator[str]:
    """Yields the base URL (``http://127.0.0.1:PORT/v1``) while the server runs; skips when the
    serving extra is missing; fails with the server's log when it does not come up."""
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"transformers serve needs the serving extra (missing {', '.join(missing)}): "
                    "pip install 'transformers[serving]'")
    httpx = pytest.importorskip("httpx2")
    port, log_path = free_port(), root / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    cmd = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
           str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + SERVE_START_TIMEOUT_S
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    pytest.fail(f"transformers serve did not become healthy (exit {proc.poll()}):\n{tail}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
