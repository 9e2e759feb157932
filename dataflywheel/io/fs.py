"""One filesystem layer for every path we take: local paths, ``gs://``, ``s3://``, ``hf://`` and any
other fsspec URL.

Why fsspec (with gcsfs / s3fs) and not Beam's ``FileSystems``: the training stage, the flywheel and
the readers must not import Beam (the layering rule), fsspec gives a streaming, seekable file
object for any URL (pyarrow, our WARC and gzip readers read it in chunks: a 1 GB object is never
held in memory), globs with ``**``, and ``hf://`` for free through ``huggingface_hub``. Local paths
keep the plain ``os`` calls: they stay as the user wrote them, and a local write can be made atomic
by rename, which object stores do not have.

Credentials are never taken from configs: gcsfs uses Application Default Credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth``, the metadata server), s3fs the ``AWS_*``
variables (``AWS_ENDPOINT_URL`` for S3-compatible stores), ``hf://`` ``HF_TOKEN``. ``redact``
removes their values (and any ``user:secret@`` in a URL) from text we print or save.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "GOOGLE_OAUTH_ACCESS_TOKEN", "CLOUDSDK_AUTH_ACCESS_TOKEN")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")
READ_BLOCK = 4 << 20  # bytes fetched per request when reading a remote file: memory per open file ~2 blocks
CACHE_ENV = "DATAFLYWHEEL_CACHE"  # where remote models are copied to be loaded (default ~/.cache/dataflywheel)


def scheme(path: str) -> str:
    """The URL scheme of ``path`` ("gs", "s3", "hf"...), or "" for a local path (``file://`` included)."""
    m = _SCHEME.match(str(path))
    return "" if m is None or m.group(1) == "file" else m.group(1)


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(str(path)) != ""


def local_path(path: str | os.PathLike) -> str:
    """A local path as a plain string (``file://`` stripped)."""
    text = os.fspath(path)
    return text[len("file://"):] if text.startswith("file://") else text


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; the filesystem is cached by fsspec per process."""
    from fsspec.core import url_to_fs

    from ..errors import UserError

    if _USERINFO.match(path):
        raise UserError(f"{redact(path)}: credentials in a URL are not accepted; they come from the environment "
                        "(Application Default Credentials for gs://, AWS_* for s3://, HF_TOKEN for hf://)")
    # No listings cache: other processes (Beam workers, a killed run's re-run) change the folders
    # we list, and the commit protocol must see the marker that is there now.
    options = {"use_listings_cache": False} if scheme(path) in ("gs", "s3") else {}
    try:
        return url_to_fs(path, **options)
    except (ImportError, ValueError) as err:
        hint = {"gs": "gcsfs (pip install 'dataflywheel[gcs]')", "s3": "s3fs (pip install 'dataflywheel[s3]')",
                "hf": "huggingface_hub"}.get(scheme(path), "the fsspec implementation for it")
        raise UserError(f"{redact(path)}: cannot open {scheme(path)}:// paths: install {hint} ({err})") from None


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...``: posix joins for URLs, ``os.path.join`` for local paths."""
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(local_path(base), *parts)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def _ask(path: str | os.PathLike, local: Callable[[str], bool], remote: str) -> bool:
    path = os.fspath(path)
    if not is_remote(path):
        return local(local_path(path))
    fs, p = filesystem(path)
    return bool(getattr(fs, remote)(p))


def exists(path: str | os.PathLike) -> bool:
    return _ask(path, os.path.exists, "exists")


def isdir(path: str | os.PathLike) -> bool:
    return _ask(path, os.path.isdir, "isdir")


def isfile(path: str | os.PathLike) -> bool:
    return _ask(path, os.path.isfile, "isfile")


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(local_path(path))
    fs, p = filesystem(path)
    return int(fs.size(p))


def has_magic(pattern: str) -> bool:
    return _glob.has_magic(pattern)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob (``**`` recursive), as full paths / URLs."""
    return [path for path, _ in glob_entries(pattern)]


def glob_entries(pattern: str) -> list[tuple[str, bool]]:
    """Sorted (path or URL, is_folder) of a glob's matches: one listing, no request per match."""
    if not is_remote(pattern):
        return [(hit, os.path.isdir(hit)) for hit in sorted(_glob.glob(local_path(pattern), recursive=True))]
    fs, p = filesystem(pattern)
    return sorted((_url(fs, hit), info.get("type") == "directory") for hit, info in fs.glob(p, detail=True).items())


def listdir(folder: str) -> list[tuple[str, bool]]:
    """(name, is_folder) of a folder's entries, sorted; [] when it does not exist."""
    if not is_remote(folder):
        try:
            with os.scandir(local_path(folder)) as it:
                return sorted((e.name, e.is_dir()) for e in it)
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, p = filesystem(folder)
    try:
        entries = fs.ls(p, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted((posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in entries)


def walk_files(folder: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names) for ``folder`` and every folder below it, top-down, sorted."""
    entries = listdir(folder)
    yield folder, [name for name, is_dir in entries if not is_dir]
    for name, is_dir in entries:
        if is_dir:
            yield from walk_files(join(folder, name))


def open_file(path: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> IO:
    """A streaming file object: local ``open`` or fsspec's buffered remote file (read in blocks)."""
    path = os.fspath(path)
    if not is_remote(path):
        return open(local_path(path), mode, **kwargs)
    fs, p = filesystem(path)
    if "r" in mode:  # s3fs reads ahead 50 MB blocks by default (100 MB held per file): bound it
        kwargs.setdefault("block_size", READ_BLOCK)
    return fs.open(p, mode, **kwargs)


def read_text(path: str | os.PathLike) -> str:
    with open_file(path, "r", encoding="utf-8") as fh:
        return fh.read()


def makedirs(path: str | os.PathLike) -> None:
    """Create a local folder; object stores have no folders (a prefix exists once an object does)."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(local_path(path), exist_ok=True)


def remove(path: str | os.PathLike) -> None:
    """Delete one file or object if it exists (one request: no batch endpoint needed)."""
    path = os.fspath(path)
    if not is_remote(path):
        with suppress(FileNotFoundError):
            os.remove(local_path(path))
        return
    fs, p = filesystem(path)
    with suppress(FileNotFoundError):
        fs.rm_file(p)
    fs.invalidate_cache(posixpath.dirname(p))


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder (or prefix) and everything below it, one object at a time."""
    path = os.fspath(path)
    if not is_remote(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    for folder, names in list(walk_files(path)):
        for name in names:
            remove(join(folder, name))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a local temp path; on success it becomes ``path`` at once and whole, or not at all.

    Local: a hidden temp file next to ``path``, fsynced and renamed onto it. Remote: a temp file in
    the local scratch folder, uploaded in one PUT (an object store shows an object only once its
    upload completes), then deleted. If the body raises, the temp file is removed.
    """
    path = os.fspath(path)
    if is_remote(path):
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix="-" + basename(path))
        os.close(fd)
        try:
            yield tmp
            fs, p = filesystem(path)
            fs.put_file(tmp, p)
            fs.invalidate_cache(posixpath.dirname(p))
        finally:
            with suppress(FileNotFoundError):
                os.remove(tmp)
        return
    folder, name = os.path.split(os.path.abspath(local_path(path)))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, local_path(path))
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the folder)."""
    with suppress(OSError):  # some filesystems cannot fsync a directory; the data is already synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (whole or not at all)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file between any two places (local, bucket), streaming; ``dst`` appears whole."""
    with open_file(src) as fin, atomic_path(dst) as tmp, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def upload_tree(local: str | os.PathLike, url: str, skip: tuple[str, ...] = (),
                skip_files: tuple[str, ...] = ()) -> list[str]:
    """Copy every file below the local folder ``local`` to ``url`` (one PUT per file); names under a
    folder called one of ``skip``, and files named one of ``skip_files``, are left out. Returns the
    relative paths copied."""
    done = []
    root = os.fspath(local)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name in skip_files:
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)
            with atomic_path(join(url, *rel.split(os.sep))) as tmp:
                shutil.copyfile(os.path.join(folder, name), tmp)
            done.append(rel)
    return done


def download_tree(url: str, local: str | os.PathLike) -> list[str]:
    """Copy every object below ``url`` into the local folder ``local``; returns the relative paths."""
    done = []
    base = url.rstrip("/")
    fs, _ = filesystem(url)
    for folder, names in walk_files(url):
        for name in names:
            src = join(folder, name)
            rel = src[len(base):].lstrip("/")
            dst = os.path.join(os.fspath(local), *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(filesystem(src)[1], dst)
            done.append(rel)
    return done


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dataflywheel")


def local_copy(path: str | os.PathLike) -> str:
    """A local path for ``path``: itself when local, else a copy of the remote file or folder in
    the cache (re-fetched when the remote listing of names, sizes and checksums changed). Models
    are loaded from local files; this is how ``--model gs://...`` reaches ``from_pretrained``."""
    path = os.fspath(path)
    if not is_remote(path):
        return local_path(path)
    fs, p = filesystem(path)
    if fs.isfile(p):
        listing = [(p, fs.info(p).get("size"), _etag(fs.info(p)))]
    else:
        listing = sorted((name, info.get("size"), _etag(info)) for name, info in fs.find(p, detail=True).items())
        if not listing:
            from ..errors import UserError

            raise UserError(f"{redact(path)}: no such file or folder")
    key = hashlib.sha256(repr((path, listing)).encode()).hexdigest()[:16]
    target = os.path.join(cache_root(), "remote", key, basename(path))
    done = target + ".complete"
    if not os.path.exists(done):
        shutil.rmtree(target, ignore_errors=True)
        if fs.isfile(p):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(p, target)
        else:
            download_tree(path, target)
        open(done, "w").close()
    return target


def _etag(info: dict) -> str:
    for key in ("md5Hash", "ETag", "etag", "crc32c", "mtime", "LastModified"):
        if info.get(key):
            return str(info[key])
    return ""


def redact(text: Any) -> str:
    """``text`` with credential values from the environment and ``user:secret@`` in URLs masked."""
    out = _USERINFO.sub(r"\1***@", str(text))
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    return out
