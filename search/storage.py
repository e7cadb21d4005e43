"""Where a study lives and how several workers share it.

``--storage`` is a journal file (the default: ``--out/study.journal``) or an RDB URL. RDB storages run with
Optuna's heartbeat: a worker killed mid-trial stops beating, and after the grace period any live worker fails
that trial and re-queues it (``RetryFailedTrialCallback``). The seeds are enqueued once per study however many
workers start (under a study-wide lock: a PostgreSQL advisory lock, else a file lock); each worker's sampler
gets its own seed; and a trial whose effective allocation another worker is measuring right now waits for that
result instead of measuring it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from prunesearch.files import file_lock, repair_line_log
from prunesearch.safety import UserError

RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg", "mysql", "mysql+mysqldb",
               "mysql+pymysql")
JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
HEARTBEAT_S = 30  # a killed worker's trial is retried about a minute later (grace: twice this)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def check_storage(url: str | None) -> str | None:
    """Validate ``--storage`` before anything is loaded or written: a known RDB scheme with its driver
    installed, or a journal file path (an existing journal, or a new file named *.journal). Returns the URL or
    path; None for the default journal in the run folder."""
    if url is None:
        return None
    if not url.strip():
        raise UserError("--storage must not be empty; leave it out for a journal in --out")
    m = _SCHEME.match(url)
    if m and len(m.group(1)) > 1:  # (a one-letter "scheme" would be a Windows drive)
        scheme = m.group(1).lower()
        if scheme not in RDB_SCHEMES:
            raise UserError(f"--storage {url!r}: unknown scheme {scheme}: (known: a journal file path, "
                            f"{', '.join(s + '://' for s in RDB_SCHEMES)}); a journal file whose name has a colon "
                            f"is written ./NAME")
        if not url[m.end():].startswith("//"):
            raise UserError(f"--storage {url!r}: a {scheme} URL looks like {scheme}://"
                            + ("/PATH.db" if scheme == "sqlite" else "USER@HOST:PORT/DATABASE"))
        if scheme == "sqlite":
            path = url[m.end() + 3:] if url[m.end():].startswith("///") else ""
            if not path or path.endswith("/"):
                raise UserError(f"--storage {url!r}: give a database file, e.g. sqlite:///runs/study.db")
            if path != ":memory:" and not Path(path).expanduser().parent.is_dir():
                raise UserError(f"--storage {url!r}: folder {Path(path).parent} does not exist")
        url = rdb_url(url)
        from sqlalchemy.engine import make_url

        try:
            make_url(url).get_dialect().import_dbapi()
        except ImportError as e:
            hint = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient"}.get(
                e.name or "", e.name)
            raise UserError(f"--storage {redact(url)} needs the Python package {e.name}: pip install {hint}") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy's URL parser raises several kinds
            raise UserError(f"--storage {redact(url)}: {(str(e).splitlines() or [''])[0]}") from None
        return url
    path = Path(url).expanduser()
    if url.endswith(("/", os.sep)) or path.is_dir():
        raise UserError(f"--storage {url} is a folder; give a journal file such as {path / 'study.journal'}")
    if path.exists() and not path.is_file():
        raise UserError(f"--storage {url} is not a regular file")
    if not path.exists():
        if path.suffix not in JOURNAL_SUFFIXES:
            raise UserError(f"--storage {url!r} is neither a database URL (sqlite:///, postgresql://, mysql://) "
                            f"nor an existing journal; a new journal file's name ends in .journal")
        if not path.parent.is_dir():
            raise UserError(f"--storage {url}: folder {path.parent} does not exist")
    return url


def rdb_url(url: str) -> str:
    """A plain ``postgresql://`` URL uses whichever PostgreSQL driver is installed (SQLAlchemy's default differs
    between versions: psycopg2 in 2.0, psycopg 3 in 2.1)."""
    import importlib.util

    if url.startswith("postgresql://"):
        for module, scheme in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
            if importlib.util.find_spec(module) is not None:
                return scheme + url[len("postgresql"):]
    return url


def is_rdb(url: str | None) -> bool:
    m = _SCHEME.match(url or "")
    return bool(m and m.group(1).lower() in RDB_SCHEMES)


def journal_path(url: str | None, out: Path) -> Path | None:
    if url is None:
        return out / "study.journal"
    return None if is_rdb(url) else Path(url).expanduser()


def open_storage(url: str | None, out: Path, heartbeat: int = HEARTBEAT_S) -> optuna.storages.BaseStorage:
    """The study's storage. A journal is repaired first (a partial last line left by a crash is cut off, so
    nothing is appended onto it); an RDB storage gets heartbeats and stale-trial retry; a database that cannot
    be reached is one line."""
    journal = journal_path(url, out)
    if journal is not None:
        if journal.is_file():
            _check_journal(journal)
            repair_line_log(journal, "journal")
        backend = optuna.storages.journal.JournalFileBackend(str(journal))
        return optuna.storages.JournalStorage(backend)
    import warnings

    import sqlalchemy.exc

    url = rdb_url(url)
    names = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    if "heartbeat_stale_trial_callback" in names:  # Optuna >= 4.9 renamed the argument and the callback
        callback, retry_class = "heartbeat_stale_trial_callback", optuna.storages.RetryHeartbeatStaleTrialCallback
    else:
        callback, retry_class = "failed_trial_callback", optuna.storages.RetryFailedTrialCallback
    try:
        for attempt in range(10):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna
                    kwargs = {"heartbeat_interval": heartbeat, "grace_period": max(2 * heartbeat, heartbeat + 2),
                              callback: retry_class(max_retry=3)}
                    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 9:
                    raise
                time.sleep(0.2 + 0.3 * attempt)  # workers creating the schema at once: another one won
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.InterfaceError) as e:
        detail = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise UserError(f"cannot open storage {redact(url)}: {detail[0] if detail else type(e).__name__}") from None


def _check_journal(path: Path) -> None:
    """Refuse a file that is not an Optuna journal before repairing or appending anything."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head and not head.lstrip().startswith(b"{"):
        raise UserError(f"--storage {path} is not an Optuna journal file")


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, url: str | None, out: Path, study_name: str) -> Iterator[None]:
    """Serialize a check-then-enqueue across every worker of the study (PostgreSQL advisory lock, MySQL GET_LOCK,
    or a file lock beside a journal / SQLite file)."""
    storage = getattr(storage, "_backend", storage)  # a study wraps an RDB storage in a cache
    if isinstance(storage, optuna.storages.RDBStorage):
        engine = storage.engine
        key = int.from_bytes(hashlib.sha256(f"prunesearch:{study_name}".encode()).digest()[:8], "big", signed=True)
        from sqlalchemy import text

        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            return
        if engine.dialect.name == "mysql":
            with engine.connect() as conn:
                conn.execute(text("SELECT GET_LOCK(:k, 600)"), {"k": f"prunesearch-{key}"})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": f"prunesearch-{key}"})
            return
        database = engine.url.database
        on_disk = database and database != ":memory:"
        lock_path = Path(database).with_name(f".{Path(database).name}.enqueue-lock") if on_disk else None
    else:
        journal = journal_path(url, out)
        lock_path = journal.with_name(f".{journal.name}.enqueue-lock")
    if lock_path is None:
        yield
        return
    with file_lock(lock_path):
        yield


def sampler_seed(seed: int, worker: int, done: int, shared: bool) -> int:
    """The sampler seed of one worker: reproducible for a run folder's own journal; with a shared storage,
    independent commands (same ``--seed``, same study size) also differ by host and process."""
    value = seed + 7919 * worker + 104729 * done
    if shared:
        value += int(hashlib.sha256(f"{os.uname().nodename}:{os.getpid()}".encode()).hexdigest()[:8], 16)
    return value % 2**32


def measured_twin(trial: optuna.Trial, key: tuple, key_of: Callable[[list[float]], tuple], max_wait: float = 900.0,
                  poll: float = 0.5) -> optuna.trial.FrozenTrial | None:
    """A completed trial of the study whose allocation has the same effective ``key`` (``key_of`` an allocation).
    If an earlier trial with it is running (on another worker), wait for its result rather than measure it twice;
    if that trial fails (or is still running after ``max_wait`` s), None: measure it here."""
    from search.faults import fail_stale

    start = time.time()
    while True:
        running = False
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if "allocation" not in t.user_attrs or key_of(t.user_attrs["allocation"]) != key:
                continue
            if t.state == TrialState.COMPLETE:
                return t
            running = running or t.number < trial.number
        if not running or time.time() - start > max_wait:
            return None
        time.sleep(poll)
        fail_stale(trial.study)

