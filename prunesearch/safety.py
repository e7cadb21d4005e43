"""Refusals that protect the user's data: non-finite weights, ``--overwrite`` of folders prunesearch did not write,
and a second command on a live run folder.

Every output folder prunesearch creates holds a marker file (:data:`MARKER`); ``--overwrite`` replaces only
such folders, and never the current directory, one of its parents, or the home directory. A search run folder
is locked (``flock`` on :data:`LOCK`) for the life of the command that runs in it, so a second command on it is
refused and only a folder whose lock is free is treated as left by a dead run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

MARKER = ".prunesearch"
LOCK = ".prunesearch.lock"
# Folders written before the marker existed are recognized by the file each command always wrote.
LEGACY_MARKERS = ("run_config.json", "prune_report.json", "ast_report.json", "predictor.json")


class UserError(ValueError):
    """Bad input or a refused action: the CLI prints it as one line and exits with status 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), to quote in a one-line UserError."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ------------------------------------------------------------------------------------------------------------
# Non-finite weights


def check_finite(model, source: str = "the model") -> None:
    """Refuse a model with a NaN or infinite weight (it would prune, evaluate and search to NaN): one line naming
    the first such tensor."""
    import torch

    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        with torch.no_grad():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = int(torch.isnan(t).sum())
                inf = int((~finite).sum()) - nan
                raise UserError(f"{source} has non-finite weights: tensor {name} holds {nan} NaN and {inf} infinite "
                                f"values of {t.numel()}; fix or re-export the checkpoint")


# ------------------------------------------------------------------------------------------------------------
# Output folders and --overwrite


def is_output(folder: Path) -> bool:
    """Whether ``folder`` was written by prunesearch (marker file, or a legacy report file)."""
    return any((folder / name).is_file() for name in (MARKER, *LEGACY_MARKERS))


def mark_output(folder: Path, kind: str) -> None:
    """Write the marker that lets a later ``--overwrite`` replace this folder."""
    from prunesearch import __version__
    from prunesearch.files import atomic_json

    if not (folder / MARKER).exists():
        atomic_json(folder / MARKER, {"written_by": "prunesearch", "kind": kind, "version": __version__})


def _locked(folder: Path) -> bool:
    lock = folder / LOCK
    if not lock.is_file():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is a prunesearch output that no running command is using, and not the
    current directory, a parent of it, or the home directory."""
    real = path.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"--overwrite refuses {path}: it is the current directory or one of its parents")
    if real == home or real in home.parents:
        raise UserError(f"--overwrite refuses {path}: it is the home directory or one of its parents")
    if not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder")
    if any(path.iterdir()) and not is_output(path):
        raise UserError(f"--overwrite refuses {path}: it was not written by prunesearch (no {MARKER} marker "
                        f"file); delete it yourself or choose another --out")
    if _locked(path):
        raise UserError(f"--overwrite refuses {path}: a running prunesearch command is using it")


def check_out(out: str | Path, overwrite: bool) -> Path:
    """Validate an ``--out`` before anything is loaded or written: a new path, or with ``--overwrite`` a folder
    prunesearch may replace. The one rule for prune, ast, predictor retrain (and search's run folder)."""
    path = Path(out).expanduser()
    if not str(out).strip():
        raise UserError("--out must not be empty")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"--out {path} already exists; pass --overwrite to replace it")
        check_replaceable(path)
    elif path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"--out {path}: {path.parent} is not a folder")
    return path


def remove_output(path: Path) -> None:
    """Remove an output folder that :func:`check_replaceable` allows (checked again right before deleting)."""
    if path.exists():
        check_replaceable(path)
        shutil.rmtree(path)


@contextlib.contextmanager
def output_folder(out: Path, kind: str) -> Iterator[Path]:
    """Write a new output folder at a temporary path beside ``out``; on success it is marked and replaces ``out``
    (an allowed prunesearch output, checked first) in one rename; on failure nothing at ``out`` changes."""
    from prunesearch.files import atomic_path

    if out.exists():
        check_replaceable(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        yield tmp
        mark_output(tmp, kind)


# ------------------------------------------------------------------------------------------------------------
# Liveness lock of a run folder


class RunLock:
    """An exclusive ``flock`` on ``folder/.prunesearch.lock`` held while a command runs in ``folder``; the kernel
    releases it when the process dies (even by ``kill -9``), so a free lock means no live command uses the folder."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._file = None

    def acquire(self) -> RunLock:
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise UserError(f"--out {self.path.parent} is in use by a running prunesearch command"
                            f"{f' ({holder})' if holder else ''}; wait for it to end or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

