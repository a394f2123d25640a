"""Content-keyed artifact store: a changed input can never meet a stale output.

Every artifact is a directory named by the hash of everything it was built from (input file
hashes, settings, library versions). A build happens under a file lock (so xdist workers and
parallel processes build it once), in a temporary directory that is renamed into place only
when complete, with a manifest of the file hashes written last; a directory whose files do not
match its manifest (a killed build, a disk error) is never used and is rebuilt.

The cache holds shared libraries that are loaded (TVM engines, the oneDNN shim), so it is
private: the root, stage and entry directories are created 0700, and one owned by another
user or writable by group or others is refused, never loaded (ancestors are not checked: a
private root under /tmp is fine).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from .errors import UserError

MANIFEST = "manifest.json"
_file_hash_memo: dict[tuple[str, int, int], str] = {}


def default_cache_dir() -> Path:
    """``$SSD_PIPELINE_CACHE``, else ``~/.cache/ssd_pipeline``."""
    env = os.environ.get("SSD_PIPELINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ssd_pipeline"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, memoised on (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    memo_key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _file_hash_memo:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _file_hash_memo[memo_key] = h.hexdigest()
    return _file_hash_memo[memo_key]


def check_private(path: Path, what: str) -> None:
    """Refuse a directory that someone else could have written: owned by another user, or
    writable by group or others. ``path`` is stat'ed without following a final symlink."""
    st = path.lstat()
    fix = ("point SSD_PIPELINE_CACHE or --cache-dir at a directory of your own, or remove "
           f"{path} and let the suite create it again")
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{what} {path} is a symbolic link, which the cache never creates: {fix}")
    if st.st_uid != os.geteuid():
        raise UserError(f"{what} {path} is owned by uid {st.st_uid}, not by you "
                        f"(uid {os.geteuid()}): the suite loads code from its cache and uses "
                        f"only a cache of your own; {fix}")
    if st.st_mode & 0o022:
        raise UserError(f"{what} {path} is writable by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}): anyone who can write it can plant "
                        f"code the suite would load; run 'chmod go-w {path}' or {fix}")


def _private_mkdir(path: Path) -> None:
    """mkdir 0700 (explicitly: the umask could only narrow it, but say what we mean)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)


def key_of(inputs: dict[str, Any]) -> str:
    """Stable hash of a JSON-able description of what an artifact is built from."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _dir_hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): file_sha256(p)
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


class ArtifactStore:
    """Builds and finds artifacts under ``root/<stage>/<key>/``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        root = Path(root) if root is not None else default_cache_dir()
        self.root = root
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            _private_mkdir(root)
            # the root may be a symlink the user made (a cache on another disk): follow it
            self.root = root.resolve()
            check_private(self.root, "cache directory")
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"cache directory {self.root} is not writable ({e.strerror}); "
                "set SSD_PIPELINE_CACHE or --cache-dir to a writable directory"
            ) from None

    def _log(self, event: str, stage: str, key: str, **extra: Any) -> None:
        # One line per build event: lets tests (and people) prove "built once" across
        # processes. Appends of short lines are atomic enough on local filesystems.
        rec = {"t": time.time(), "event": event, "stage": stage, "key": key[:16],
               "pid": os.getpid(), "host": socket.gethostname(), **extra}
        with open(self.root / "events.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def events(self) -> list[dict[str, Any]]:
        path = self.root / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def lookup(self, stage: str, inputs: dict[str, Any]) -> Path | None:
        """The artifact directory if a complete, intact one exists, else None."""
        d = self.root / stage / key_of({"stage": stage, **inputs})
        return d if self._valid(d) else None

    @staticmethod
    def _valid(d: Path) -> bool:
        """Complete and intact; a directory that is there but not private is refused."""
        if not d.exists() and not d.is_symlink():
            return False
        check_private(d.parent, "cache stage directory")
        check_private(d, "cache entry")
        m = d / MANIFEST
        if not m.is_file():
            return False
        try:
            manifest = json.loads(m.read_text())
            return manifest["files"] == _dir_hashes(d) and bool(manifest["files"])
        except (OSError, ValueError, KeyError):
            return False

    def get_or_build(
        self,
        stage: str,
        inputs: dict[str, Any],
        build: Callable[[Path], None],
    ) -> Path:
        """Return the directory of the artifact for ``inputs``, building it at most once.

        ``build(tmpdir)`` writes the artifact's files into ``tmpdir``; on success the
        directory is published atomically with a manifest of its file hashes.
        """
        key = key_of({"stage": stage, **inputs})
        final = self.root / stage / key
        if self._valid(final):
            return final
        _private_mkdir(final.parent)
        check_private(final.parent, "cache stage directory")
        with FileLock(str(final) + ".lock"):
            if self._valid(final):  # another process built it while we waited
                return final
            if final.exists():  # left by a killed build or corrupted: never used
                self._log("discard-invalid", stage, key)
                shutil.rmtree(final)
            tmp = final.parent / f".tmp-{key[:16]}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _private_mkdir(tmp)
            t0 = time.perf_counter()
            self._log("build-start", stage, key)
            try:
                build(tmp)
                files = _dir_hashes(tmp)
                if not files:
                    raise RuntimeError(f"build of {stage} wrote no files")
                manifest = {"stage": stage, "key": key, "inputs": inputs, "files": files,
                            "build_s": round(time.perf_counter() - t0, 3),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                os.replace(tmp, final)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                self._log("build-failed", stage, key)
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise UserError(
                        f"no space left in the cache directory {self.root} while building "
                        f"{stage}: free some space or point SSD_PIPELINE_CACHE / --cache-dir "
                        "elsewhere (nothing half-written was kept)") from None
                raise
            self._log("build-done", stage, key, seconds=manifest["build_s"])
            return final
