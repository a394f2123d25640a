"""The artifact store never hands out a stale, partial or corrupted artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ssd_pipeline.core.cache import ArtifactStore
from ssd_pipeline.core.errors import UserError


def writer(text: str):
    def build(tmp):
        (tmp / "a.txt").write_text(text)

    return build


def test_same_inputs_build_once(tmp_path):
    store = ArtifactStore(tmp_path)
    d1 = store.get_or_build("s", {"x": 1}, writer("one"))
    d2 = store.get_or_build("s", {"x": 1}, writer("two"))
    assert d1 == d2 and (d1 / "a.txt").read_text() == "one"
    assert [e["event"] for e in store.events()].count("build-done") == 1


def test_changed_input_never_reuses(tmp_path):
    store = ArtifactStore(tmp_path)
    d1 = store.get_or_build("s", {"x": 1}, writer("one"))
    d2 = store.get_or_build("s", {"x": 2}, writer("two"))
    assert d1 != d2 and (d2 / "a.txt").read_text() == "two"


def test_corrupted_artifact_is_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    d = store.get_or_build("s", {"x": 1}, writer("one"))
    (d / "a.txt").write_text("bit rot")
    assert store.lookup("s", {"x": 1}) is None
    d2 = store.get_or_build("s", {"x": 1}, writer("one"))
    assert (d2 / "a.txt").read_text() == "one"
    assert "discard-invalid" in [e["event"] for e in store.events()]


def test_failed_build_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(tmp):
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError):
        store.get_or_build("s", {"x": 1}, boom)
    assert store.lookup("s", {"x": 1}) is None
    assert not [p for p in (tmp_path / "s").iterdir() if not p.name.endswith(".lock")]


def test_killed_build_is_not_taken_as_valid(tmp_path):
    """SIGKILL in the middle of a build; the next run rebuilds."""
    script = (
        "import sys, time\n"
        "from ssd_pipeline.core.cache import ArtifactStore\n"
        "def build(tmp):\n"
        "    (tmp / 'a.txt').write_text('partial')\n"
        "    print('building', flush=True)\n"
        "    time.sleep(60)\n"
        f"ArtifactStore({str(tmp_path)!r}).get_or_build('s', {{'x': 1}}, build)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = ArtifactStore(tmp_path)
    assert store.lookup("s", {"x": 1}) is None
    t0 = time.time()
    d = store.get_or_build("s", {"x": 1}, writer("complete"))
    assert (d / "a.txt").read_text() == "complete" and time.time() - t0 < 30


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"cache directory .* is not writable"):
        ArtifactStore(blocker / "cache")


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path):
    import errno

    store = ArtifactStore(tmp_path)

    def fills_the_disk(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="no space left in the cache directory"):
        store.get_or_build("s", {"x": 1}, fills_the_disk)
    assert store.lookup("s", {"x": 1}) is None
    assert not [p for p in (tmp_path / "s").iterdir() if not p.name.endswith(".lock")]
