"""Resuming a run that died, and keeping a run folder honest: fingerprint, lock, fault injection.

A run folder is a function of the command (``hydra.run.dir`` hashes the overrides), so starting the same
command again lands in the same folder; the answered questions are read back from ``predictions.jsonl``
and the finished videos from ``memory_stats.jsonl`` (see :mod:`mukv.report.outputs`: any prefix of a
journal is readable), and the run continues at the first unanswered question.

- **Fingerprint** (``fingerprint.json``): what a result depends on, namely the resolved config less
  presentation keys (``PRESENTATION_KEYS``), the annotation file's content hash, the checkpoint (the nano
  files' hashes; a Hub id with the cached revision; a local folder's files), a hash of every source file of
  the ``mukv`` package, the versions of mukv, torch, transformers and numpy. The git commit is recorded but
  not compared (the source hashes are: they also see edits that are not committed, and a commit that
  changes no source file changes no result). Results made under another fingerprint are not reused unless
  ``resume=force``; ``resume=false`` moves them aside.
- **Lock** (``run.lock``): one run per folder. The holder keeps a kernel lock (``flock``) on the file,
  which names its pid, host and start; a second run exits naming the holder. A lock left by a run that
  died on this host is taken over (the kernel released it); one naming another host is never taken over.
- **Fault injection** (tests): ``MUKV_FAULT=<point>:<n>`` ends the process with ``os._exit(86)`` (no
  clean-up, as a SIGKILL) the ``n``-th time a run passes ``<point>``: ``answer`` (an answer's row was
  written), ``video`` (a video's memory row was written), ``metrics`` (every row is written, metrics.json
  is not). ``MUKV_FAULT=<point>:<n>:raise`` raises ``FaultInjected`` there instead (a ``BaseException``
  nothing in the pipeline catches), for tests that stop a run in their own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from mukv.errors import MukvError

FINGERPRINT = "fingerprint.json"
LOCK = "run.lock"
FAULT_ENV = "MUKV_FAULT"
FAULT_EXIT = 86
FAULT_POINTS = ("answer", "video", "metrics")
# Config keys that change how a run looks, not what it computes (left out of the fingerprint).
PRESENTATION_KEYS = ("engine.progress", "resume", "logger", "paths", "task_name", "tags", "explorer")
PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARIES = ("mukv", "torch", "transformers", "numpy")


def short_hash(text: str, length: int = 8) -> str:
    """A stable short digest of a string (used in run folder names)."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:length]


# ------------------------------------------------------------------------------------ fault injection
_fault_hits: dict[str, int] = {}


class FaultInjected(BaseException):
    """``MUKV_FAULT=<point>:<n>:raise`` stopped the run here."""


def arm_faults() -> None:
    """Count fault points from zero (a run calls this when it starts)."""
    _fault_hits.clear()


def fault_point(name: str) -> None:
    """Die here (``os._exit(FAULT_EXIT)``) if ``MUKV_FAULT`` says so (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, count, action = (spec.split(":") + ["1", "exit"])[:3]
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(count or 1):
        if action == "raise":
            raise FaultInjected(spec)
        os._exit(FAULT_EXIT)


# ----------------------------------------------------------------------------------------- processes
def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), to tell it from a later process that got
    the same pid; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` (started at ``start``, if known) still runs on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    except (OverflowError, ValueError, TypeError):
        return False
    now = process_start(int(pid))
    return start is None or now is None or now == start


def holder_info() -> dict[str, Any]:
    """This process, as a lock file or a spill folder names its owner."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---------------------------------------------------------------------------------------------- lock
class RunLockedError(MukvError):
    """Another run holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder (see the module docstring); ``stale``: the holder a lock left
    behind by a dead run named, when this lock took it over."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        import fcntl

        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(self._held_by(holder)) from None
            except OSError:  # a file system without flock: the holder's pid, checked below, decides
                pass
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released and removed it between our open and flock: again
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous:
                here = previous.get("host") == socket.gethostname()
                if not here or process_alive(previous.get("pid", -1), previous.get("start")):
                    os.close(fd)  # another host's lock (unknowable), or a live holder where flock is not enforced
                    raise RunLockedError(self._held_by(previous, remote=not here))
                self.stale = previous
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunLockedError(f"{self.path}: could not be locked (removed and created again repeatedly)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _held_by(self, holder: dict[str, Any] | None, remote: bool = False) -> str:
        folder = self.path.parent
        if not holder:
            return f"run folder {folder} is in use by another run (its lock {self.path} names no holder yet)"
        who = f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
        if remote:
            return (f"run folder {folder} is locked by {who}; a process on another host cannot be checked: "
                    f"if that run is gone, delete {self.path}")
        return f"run folder {folder} is in use by {who}; wait for it to end, or give this run another folder"


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------- fingerprint
class StaleResultsError(MukvError):
    """A run folder holds results made under another fingerprint."""


def file_digest(path: Path, whole_up_to: int = 64 << 20, edge: int = 4 << 20) -> str:
    """sha256 of a file; past ``whole_up_to`` bytes, of its size, first and last ``edge`` bytes (a
    multi-GB checkpoint is not read in full at every start)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= whole_up_to:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"size {size}".encode())
            h.update(f.read(edge))
            f.seek(size - edge)
            h.update(f.read(edge))
    return h.hexdigest()


def folder_digests(folder: Path, pattern: str = "*") -> dict[str, str]:
    """{relative path: digest} of the files under ``folder`` matching ``pattern`` (hidden and cache
    folders skipped)."""
    out = {}
    for p in sorted(folder.rglob(pattern)):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            out[rel.as_posix()] = file_digest(p)[:16]
    return out


def code_digests() -> dict[str, str]:
    """Digests of the ``mukv`` package's source files."""
    return folder_digests(PACKAGE_DIR, "*.py")


def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and commit else None


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def checkpoint_fingerprint(kind: str, path: str | None) -> dict[str, Any]:
    """What identifies the model's weights: nano and local folders by their files, a Hub id by the revision
    in the local Hub cache (None when not cached yet); tiny models are built from the config."""
    if kind in ("tiny", "qwen_tiny"):
        return {"kind": kind, "files": None}
    if kind == "nano":
        from mukv.models.nano import nano_dir

        folder = nano_dir(path)
        return {"kind": "nano", "folder": str(folder), "files": folder_digests(folder) if folder.is_dir() else None}
    local = Path(str(path)).expanduser()
    if local.is_dir():
        return {"kind": kind, "folder": str(local), "files": folder_digests(local)}
    return {"kind": kind, "hub_id": path, "revision": _hub_revision(str(path))}


def _hub_revision(repo_id: str) -> str | None:
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
        return ref.read_text().strip() or None
    except (ImportError, OSError, AttributeError):
        return None


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.get(key) if isinstance(tree.get(key), dict) else {}
    tree.pop(last, None)


def _model_kind(cfg: Any) -> str | None:
    """tiny | nano | pretrained: the label of the loader ``model._target_`` names."""
    from mukv.models.loading import model_loader

    return model_loader(cfg.model).kind if "model" in cfg else None


def fingerprint(cfg: Any) -> dict[str, Any]:
    """The fingerprint of a composed run config (see the module docstring)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in PRESENTATION_KEYS:
        _drop(config, key)
    ds = config.get("dataset", {})
    annotation = None
    if ds.get("annotation"):
        ann = Path(ds["annotation"])
        annotation = {"path": str(ann), "sha256": file_digest(ann) if ann.is_file() else None}
    model = config.get("model", {})
    return {"config": config, "annotation": annotation,
            "checkpoint": checkpoint_fingerprint(_model_kind(cfg), model.get("path")),
            "code": code_digests(), "versions": library_versions(), "git_commit": git_commit(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S")}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _changed(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    old, new = old or {}, new or {}
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def fingerprint_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per difference (empty: the same)."""
    if not isinstance(old, dict):
        return [f"no readable {FINGERPRINT} (results written before fingerprints, or the file was removed)"]
    changes = []
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    keys = _changed(a, b)
    if keys:
        changes.append("config " + _few([f"{k}: {_short(a.get(k, '(absent)'))} -> {_short(b.get(k, '(absent)'))}"
                                          for k in keys], 3))
    oa, na = old.get("annotation") or {}, new.get("annotation") or {}
    if oa.get("sha256") != na.get("sha256"):
        changes.append(f"annotation file {na.get('path') or oa.get('path')}: content changed")
    oc, nc = old.get("checkpoint") or {}, new.get("checkpoint") or {}
    if oc != nc:
        where = nc.get("folder") or nc.get("hub_id") or nc.get("kind")
        files = _changed(oc.get("files"), nc.get("files"))
        detail = f"{_few(files)} changed" if files else (
            f"revision {oc.get('revision')} -> {nc.get('revision')}" if "revision" in nc else "changed")
        changes.append(f"checkpoint {where}: {detail}")
    files = _changed(old.get("code"), new.get("code"))
    if files:
        changes.append(f"code: {_few(['mukv/' + f for f in files])} changed")
    versions = _changed(old.get("versions"), new.get("versions"))
    if versions:
        ov, nv = old.get("versions") or {}, new.get("versions") or {}
        changes.append("versions " + _few([f"{k} {ov.get(k)} -> {nv.get(k)}" for k in versions]))
    return changes


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------- resume state
def answered_questions(rows: list[dict[str, Any]]) -> set[str]:
    """Question ids already answered (a row exists, error or not)."""
    return {str(r["qid"]) for r in rows if "qid" in r}


def finished_videos(rows: list[dict[str, Any]]) -> set[str]:
    """Videos whose last memory row was written without an error (fully streamed)."""
    last = {str(r.get("video_id")): r for r in rows}
    return {v for v, r in last.items() if not r.get("error")}
