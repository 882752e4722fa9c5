"""Files that must be whole or absent, and folders that several processes may ask to build at once."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from catalog_gen.storage import build_once


def _slow_build(staging: Path, log: Path) -> None:
    with open(log, "a") as handle:  # O_APPEND: one line per build, whichever process made it
        handle.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # long enough that the other process arrives while this one builds
    (staging / "weights.bin").write_bytes(b"x" * 1000)
    (staging / "done.json").write_text("{}")


def _ask(folder: Path, log: Path, results) -> None:
    path = build_once(folder, lambda p: (p / "done.json").is_file(), lambda staging: _slow_build(staging, log))
    results.put((path / "weights.bin").read_bytes() == b"x" * 1000)


def test_two_processes_asking_at_once_build_the_folder_once(tmp_path):
    folder, log = tmp_path / "cache" / "preset-v1", tmp_path / "builds.log"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_ask, args=(folder, log, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert [results.get(timeout=5), results.get(timeout=5)] == [True, True], "a process read a missing folder"
    assert len(log.read_text().splitlines()) == 1, "built twice"
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]


def test_an_interrupted_build_leaves_nothing_that_looks_finished(tmp_path):
    folder = tmp_path / "preset-v1"

    def broken(staging: Path) -> None:
        (staging / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    try:
        build_once(folder, lambda p: (p / "done.json").is_file(), broken)
    except KeyboardInterrupt:
        pass
    assert not folder.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    built = build_once(folder, lambda p: (p / "done.json").is_file(), lambda s: (s / "done.json").write_text("{}"))
    assert (built / "done.json").is_file()


def test_a_preset_missing_its_weights_is_built_again(tmp_path):
    # What transformers 5 left behind when a preset was built off rank 0: the marker, no model.
    from catalog_gen.models.embedder_presets import materialise_embedder_preset

    folder = materialise_embedder_preset("tiny-dino", cache_dir=tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").unlink()
    (folder / "config.json").unlink()
    assert materialise_embedder_preset("tiny-dino", cache_dir=tmp_path) == folder
    assert (folder / "model.safetensors").read_bytes() == weights


def test_published_files_and_folders_honour_the_umask(tmp_path):
    """mkstemp / mkdtemp make private 0600 / 0700 entries; what the product writes must not stay private."""
    import os
    import stat

    from catalog_gen.storage import atomic_directory, atomic_path, atomic_write_bytes

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        with atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"png")
        with atomic_directory(tmp_path / "adapter") as staging:
            (staging / "w.safetensors").write_bytes(b"w")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.json", b"{}")
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE((tmp_path / p).stat().st_mode)  # noqa: E731
    assert (mode("a.json"), mode("b.png"), mode("adapter")) == (0o644, 0o644, 0o755)
    assert mode("private.json") == 0o600  # a stricter umask is honoured too


def test_the_lock_excludes_two_holders_and_names_itself_when_it_times_out(tmp_path, monkeypatch):
    import threading

    from catalog_gen import storage
    from catalog_gen.errors import CatalogError

    lock_file = tmp_path / ".lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with storage.exclusive_lock(lock_file):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    monkeypatch.setattr(storage, "LOCK_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(CatalogError, match=r"\.lock is held by another catalog command"):
            with storage.exclusive_lock(lock_file):
                pass
    finally:
        release.set()
        thread.join()
    with storage.exclusive_lock(lock_file):  # free again
        pass
