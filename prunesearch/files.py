"""Crash-safe files: atomic writes, file locks, caches that recompute when corrupt, and line-log repair.

Every result and cache prunesearch writes goes through :func:`atomic_path` (a temporary file in the same folder,
then ``os.replace``), so a crash or ``kill -9`` leaves either the old file or the new one, never half of one.
Caches are read through :func:`load_or_build`: an unreadable cache is recomputed (with a warning), and
concurrent builders of one cache (several search workers sharing ``--cache-dir``) wait on a lock instead of all
computing it. Append-only line logs (the Optuna journal, ``predictor_rounds.jsonl``) are repaired by
:func:`repair_line_log` before anything is appended: a partial last line left by a crash is cut off.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prunesearch.safety import UserError, first_line

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("prunesearch.files")
T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one rename.
    A folder written at the temporary path replaces a folder at ``path`` (the old one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # the writer creates it (some writers refuse an existing file)
    try:
        yield tmp
        if tmp.is_dir():
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            if tmp.exists():
                os.chmod(tmp, mode)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def atomic_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if absent) for the block; yields False when ``blocking`` is
    off and another process holds it. Released when the block ends or the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_or_build(path: str | Path, load: Callable[[Path], T], build: Callable[[], T],
                  save: Callable[[T, Path], None], what: str = "cache") -> T:
    """The object cached at ``path``; else built, saved atomically and returned. A cache that cannot be read
    (truncated, corrupt) is recomputed with a warning, not fatal. Concurrent callers on one path (processes
    sharing a cache folder) build it once: the others wait on a lock beside it, then load it."""
    path = Path(path)
    if path.exists():
        try:
            return load(path)
        except Exception:  # noqa: BLE001 - any unreadable cache is recomputed below, under the lock
            pass
    with file_lock(path.with_name(f".{path.name}.lock")):
        if path.exists():
            try:
                return load(path)
            except Exception as e:  # noqa: BLE001
                reason = (str(e).splitlines() or [""])[0][:160]
                warn(f"{what} {path} is unreadable ({type(e).__name__}: {reason}); recomputing it")
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        obj = build()
        with atomic_path(path) as tmp:
            save(obj, tmp)
        return obj


def warn(message: str) -> None:
    """A one-line warning on stderr and in the run log."""
    log.warning(message)
    print(f"prunesearch: warning: {message}", file=sys.stderr, flush=True)


def repair_line_log(path: str | Path, what: str = "journal") -> int:
    """Cut a partial (or undecodable) last line off an append-only JSON-lines file, keeping every complete line,
    before anything is appended to it; returns the number of bytes removed (and says so on stderr).
    A damaged line in the middle of the file cannot be repaired safely: that is a UserError with the fix."""
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        data = f.read()
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except ValueError:
            keep = last_start
    for lineno, line in enumerate(data[:keep].splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError:
            raise UserError(f"{what} {path} is damaged at line {lineno} (not the last line, so it cannot be "
                            f"repaired by truncation); restore it from a backup or start a new --out") from None
    removed = len(data) - keep
    if removed:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        warn(f"{what} {path}: removed a partial last line ({removed} bytes) left by an interrupted write; "
             f"every complete line is kept")
    return removed


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file the user gave or pointed at (a run's or a predictor's record, a config); one that cannot be read
    or parsed is a :class:`~prunesearch.safety.UserError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path} is not readable JSON ({first_line(e)}); restore or re-create it") from e


def read_json_lines(path: str | Path, what: str) -> list:
    """Every non-blank line of a JSON-lines file the user pointed at, decoded; a damaged file is a UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({first_line(e)})") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{what} {path} is damaged at line {lineno} ({e.msg})") from e
    return rows


def read_parquet(path: str | Path, what: str) -> pd.DataFrame:
    """A parquet table the user pointed at (a run's trials, a pairs file); an unreadable one is a UserError."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (corrupt or not parquet) is a ValueError
        raise UserError(f"{what} {path} is not a readable parquet table ({first_line(e)})") from e
