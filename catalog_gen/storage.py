"""Small file helpers shared by every stage: atomic writes, hashes, safe paths.

Every result is written to a temporary name in the same folder and then renamed,
so a crash never leaves a half-written file that later looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

_HASH_CHUNK = 1 << 20
LOCK_TIMEOUT_S = 600.0
"""How long a command waits for another one's lock before it says so and stops."""


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it back at once
    os.umask(current)
    return current


def _as_if_created(path: Path, directory: bool = False) -> None:
    """mkstemp / mkdtemp make 0600 / 0700 entries; what we publish gets the modes any tool's output gets
    (0666 / 0777 less the umask), so a catalogue team or a web server can read it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _as_if_created(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path in the destination folder; rename it over `path` on success.

    For writers that want a file name rather than bytes (PIL, safetensors, polars).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _as_if_created(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Build a whole folder under a temporary name and move it into place at the end.

    An existing folder at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        _as_if_created(staging, directory=True)
        if path.exists():
            retired = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(folder: Path, prefix: str = ".", keep: tuple[str, ...] = ()) -> list[Path]:
    """Remove what killed writers left in `folder`: the hidden temporaries of atomic_write_bytes / atomic_path
    (files) and atomic_directory (staging and retired folders), those whose names start with `prefix`.
    Entries named in `keep` (or starting with one of them) stay. Call it only while holding the lock that
    keeps every other writer of the folder out. Returns what was removed."""
    removed = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        hidden_leftover = path.name.startswith(".") and path.name.startswith(prefix)
        if not hidden_leftover or (keep and path.name.startswith(keep)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def exclusive_lock(lock_file: Path, timeout: float | None = None, busy: str | None = None) -> Iterator[None]:
    """An exclusive lock held while the block runs, across threads, processes and servers, on Linux,
    macOS and Windows (filelock: flock / msvcrt underneath). Each call opens the lock on its own, so two
    threads of one process exclude each other too. The lock file is never deleted: deleting it would let
    a process that opened the old file and one that created a new one both hold "the" lock. Waiting longer
    than LOCK_TIMEOUT_S (or `timeout`; 0: do not wait) is an error naming the lock (or saying `busy`), not a
    silent hang.
    """
    from filelock import FileLock, Timeout

    from catalog_gen.errors import CatalogError

    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    wait = LOCK_TIMEOUT_S if timeout is None else timeout
    lock = FileLock(str(lock_file), timeout=wait, thread_local=False, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        raise CatalogError(busy or f"{lock_file} is held by another catalog command for over {wait:.0f} s; "
                                   "wait for it to finish, or stop it") from None
    try:
        yield
    finally:
        lock.release()


def build_once(folder: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """`folder`, built by `build(staging)` unless `is_complete(folder)` says a finished one is there.

    Several processes may ask at once (accelerate launch, two terminals): one builds while the
    others wait, then find it complete. Without the lock the second builder's swap removed the
    folder for a moment while the first was already reading it.
    """
    folder = Path(folder)
    if is_complete(folder):
        return folder
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")):
        if is_complete(folder):  # built by another process while this one waited
            return folder
        # Built under a temporary name and renamed: an interrupted build is never mistaken for a finished one.
        with atomic_directory(folder) as staging:
            build(staging)
    return folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_inside(child: Path, parent: Path) -> bool:
    """True when `child`, with every symlink resolved, lies inside `parent`."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
        return True
    except ValueError:
        return False


def sort_safetensors_metadata(path: Path) -> Path:
    """Rewrite a safetensors file with its metadata keys in sorted order, in place.

    safetensors keeps the metadata in a hash map whose order changes from write to write, so a file with two or
    more metadata keys got other bytes (and another sha256) from identical weights: two identical runs of a
    two-stage class stage looked like two different class LoRAs. Every weights file whose hash adapter.json
    records goes through here. Tensor entries and data are untouched.
    """
    import struct

    path = Path(path)
    with open(path, "rb") as source:
        (length,) = struct.unpack("<Q", source.read(8))
        header = json.loads(source.read(length))
    metadata = header.get("__metadata__")
    if not metadata or len(metadata) < 2:
        return path
    header["__metadata__"] = dict(sorted(metadata.items()))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    # Streamed: a single-file checkpoint is gigabytes, and only its header changes. Both files are closed
    # before atomic_path renames (Windows renames no open file).
    with atomic_path(path) as tmp:
        with open(path, "rb") as source, open(tmp, "wb") as target:
            source.seek(8 + length)
            target.write(struct.pack("<Q", len(encoded)) + encoded)
            shutil.copyfileobj(source, target, 16 * 1024 * 1024)
    return path
