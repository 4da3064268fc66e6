"""A local sqlite store: created once under a lock, checked when opened, repaired when safe.

Why: MLflow 3.17.2 creates and migrates a brand-new sqlite store in every process
that opens it, with no lock (`SqlAlchemyStore.__init__` -> `_initialize_tables`;
only its workspace store takes a lock, in /tmp). Three processes opening one new
file at the same moment (2026-12-02, 2-core CPU, three trials): one trial ended
well, one at the head revision with a leftover `_alembic_tmp_runs`, one two
revisions behind with `_alembic_tmp_tags` left over, which no later process can
open ("table _alembic_tmp_tags already exists", with the CREATE statement). That
is what `dvc queue start -j 3` did to a fresh repository's mlflow.db.

So before any MlflowClient opens a local sqlite store, `prepare(uri)` takes
`<db>.lock` (filelock; an flock, released when its process dies) and, holding it
(14 ms for a ready store, against 224 ms for MLflow's own first open and search):

    no file, or no tables  create the tables and run the migrations (`mlflow db upgrade`)
    ready                  nothing: what every later process finds (head revision,
                           every table MLflow defines, no `_alembic_tmp_*` table)
    half-created, no runs  made anew (it holds nothing but MLflow's default rows)
    an older schema        a TrackingError naming `mlflow db upgrade`, as MLflow itself
                           says: an older MLflow (someone's `mlflow ui`) may still use it,
                           and could not open it after a migration
    half-migrated          repaired when that is safe: a copy is kept as
                           `<db>.<time>.bak`, a leftover `_alembic_tmp_<t>` is dropped
                           when `<t>` holds at least its rows (alembic copies a table
                           into it, drops the table, renames the copy: before the drop
                           the copy is redundant), MLflow's migrations run from the
                           recorded revision, and the result must have exactly the
                           tables, columns and indexes of a new store (checked against
                           one made in a temporary folder). If not, the backup is put
                           back and a TrackingError says what to do: move the file
                           aside and `ddpm tracking replay` the spool.
    newer schema           a TrackingError (an MLflow newer than ours wrote it).

Making a store anew deletes the file, and a failed repair writes the backup over it: both
are refused, in one line, while another process has the file open (an `mlflow ui` or
`mlflow server` on it would go on writing to a deleted file, or have its rows overwritten).

MLflow's public API has no way to read the schema's head revision: `_get_alembic_config`
(with alembic's ScriptDirectory) stays, pinned with the MLflow version by
tests/test_tracking_store.py. Creating and migrating is MLflow's `mlflow db upgrade`.

Several writers: every MLflow session sets `busy_timeout` 20 s, so writers of a
ready store wait for each other rather than fail. On top of that the store is
switched to WAL, measured 2026-12-02 (2-core CPU, other jobs running; N processes
each logging 50 params, 300 batches of 10 metrics and an end, time of the slowest):

    N = 3   rollback journal 5.4 / 13.3 / 15.3 / 19.6 s    WAL 3.7 / 4.2 / 5.4 / 9.3 s
    N = 6   rollback journal 29.2 / 19.8 / 37.7 / 30.0 s   WAL 16.0 / 14.9 / 22.7 / 12.9 s

No call failed in either mode (runs with an `mlflow ui`-like reader polling
search_runs included): WAL is chosen for speed (about 2x), not for correctness.
WAL needs the file on a local disk (it shares memory through `<db>-shm`); a store
several machines write is an `mlflow server` (docs/teams.md). The store is then `<db>`, `<db>-wal` and `<db>-shm` while a process
has it open: copy it with `sqlite3 mlflow.db ".backup copy.db"`, not `cp`.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .store import TrackingError, _first_line, _say, sqlite_path

LOCK_TIMEOUT_S = 600.0  # a large store's migrations can take minutes
LEFTOVER = "_alembic_tmp_"
# The rows a new store holds (None: none of the table's rows are runs or results).
DEFAULT_ROWS = {"alembic_version": None, "workspaces": "name = 'default'",
                "experiments": "experiment_id = 0"}

_ready: set[tuple[str, int]] = set()  # (path, inode) of the stores this process made ready


def prepare(uri: str) -> None:
    """Make the local sqlite store `uri` ready to open (see the module docstring); any
    other URI is left alone. Raises TrackingError, one line, when it cannot be."""
    db = sqlite_path(uri)
    if db is None or _key(db) in _ready:
        return
    from filelock import FileLock, Timeout

    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(f"{db}.lock", timeout=LOCK_TIMEOUT_S):
            _make_ready(db)
            _use_wal(db)
    except Timeout:
        raise TrackingError(f"{db}: another process has been creating or repairing it for "
                            f"{LOCK_TIMEOUT_S:.0f} s (it holds {db}.lock)") from None
    _ready.add(_key(db))


def _key(db: Path) -> tuple[str, int]:
    try:
        return str(db), db.stat().st_ino
    except OSError:
        return str(db), -1


@contextmanager
def _connect(db: Path) -> Iterator[sqlite3.Connection]:
    con = sqlite3.connect(db, timeout=20.0)  # MLflow's busy timeout
    try:
        with con:  # commits, or rolls back on an error
            yield con
    finally:
        con.close()


def _migrate(db: Path) -> None:
    """MLflow's own `mlflow db upgrade`: a new store's tables, or the migrations from the
    revision the file records to the head."""
    from mlflow.db import upgrade

    logger = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow ..."
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # alembic's notes on unnamed CHECK constraints
            warnings.simplefilter("ignore")
            upgrade.callback(f"sqlite:///{db}")
    finally:
        logger.setLevel(level)


class _Schema:
    """What the file holds, read with plain sqlite3: nothing is opened through MLflow."""

    def __init__(self, db: Path):
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config
        from mlflow.store.db.base_sql_model import Base  # every table, once utils is imported

        try:
            with _connect(db) as con:
                self.tables = {name for (name,) in con.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")
                    if not name.startswith("sqlite_")}
                row = con.execute("SELECT version_num FROM alembic_version").fetchone() \
                    if "alembic_version" in self.tables else None
                self.version = row[0] if row else None
        except sqlite3.DatabaseError as err:
            raise TrackingError(f"{db} cannot be read as an sqlite database ({err}): point "
                                f"mlflow.tracking_uri elsewhere or move it aside") from None
        self.leftovers = sorted(name for name in self.tables if name.startswith(LEFTOVER))
        self.missing = set(Base.metadata.tables) - self.tables
        script = ScriptDirectory.from_config(_get_alembic_config(""))
        self.head = script.get_current_head()
        try:
            self.known = self.version is None or script.get_revision(self.version) is not None
        except Exception:  # alembic raises for a revision it has no script for
            self.known = False

    def count_rows(self, db: Path) -> None:
        """`rows` per table, and `data_rows`: those a new store lacks (a leftover copy
        counts as its table). Only for a store that is not ready: it reads every table."""
        with _connect(db) as con:
            self.rows = {name: _count(con, name) for name in self.tables}
            self.data_rows = sum(_count(con, name, DEFAULT_ROWS.get(_base(name), ""))
                                 for name in self.tables
                                 if DEFAULT_ROWS.get(_base(name), "") is not None)

    @property
    def openable(self) -> bool:
        """What MLflow checks before it opens a store: the head revision, every table."""
        return self.version == self.head and not self.missing

    def describe(self) -> str:
        leftovers = f", leftover {', '.join(self.leftovers)}" if self.leftovers else ""
        return f"schema {self.version or 'none'}, MLflow's is {self.head}{leftovers}"


def _base(table: str) -> str:
    return table.removeprefix(LEFTOVER)


def _count(con: sqlite3.Connection, table: str, beyond: str = "") -> int:
    """Rows of `table`, or only those not matching `beyond` (all, if it names no column)."""
    if beyond:
        try:
            return con.execute(f'SELECT count(*) FROM "{table}" WHERE NOT ({beyond})').fetchone()[0]
        except sqlite3.OperationalError:
            pass
    return con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def _make_ready(db: Path) -> None:
    if not db.exists() or db.stat().st_size == 0:
        _migrate(db)
        return
    schema = _Schema(db)
    if schema.openable and not schema.leftovers:
        return
    if not schema.known:
        raise TrackingError(f"{db} has schema {schema.version}, which MLflow's migrations do "
                            f"not know (a newer MLflow wrote it): use that MLflow, or "
                            f"{_what_to_do(db)}")
    schema.count_rows(db)
    if schema.data_rows and not schema.leftovers and schema.version != schema.head:
        raise TrackingError(
            f"{db} holds runs in an older MLflow's schema ({schema.version}; this MLflow's is "
            f"{schema.head}): back it up and upgrade it, as MLflow says (sqlite3 {db} "
            f"\".backup {db.name}.bak\" && mlflow db upgrade sqlite:///{db}); an older MLflow "
            f"cannot open it afterwards")
    if not schema.openable and schema.data_rows == 0:
        # Nothing to keep: start again, unless a process has the file open.
        _refuse_if_open(db, f"is left half-created ({schema.describe()}) and would be made anew")
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            path.unlink(missing_ok=True)
        _migrate(db)
        if schema.tables - {"alembic_version"}:
            _say(f"{db} was left half-created ({schema.describe()}) and held no runs: "
                 f"made it anew")
    else:
        _repair(db, schema)


def _repair(db: Path, schema: _Schema) -> None:
    for leftover in schema.leftovers:
        table = _base(leftover)
        if schema.rows[leftover] > schema.rows.get(table, 0):
            raise TrackingError(f"{db} was left half-migrated: {leftover} holds "
                                f"{schema.rows[leftover]} rows that {table} lacks, and only a "
                                f"person should merge them; {_what_to_do(db)}")
    # A failed repair puts the backup back over the file.
    _refuse_if_open(db, f"is half-migrated ({schema.describe()}) and would be repaired")
    backup = db.with_name(f"{db.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
    try:
        _copy(db, backup)
    except sqlite3.Error as err:
        raise TrackingError(f"{db} is half-migrated ({schema.describe()}) and cannot be "
                            f"backed up before its repair ({err}); {_what_to_do(db)}") from None
    try:
        with _connect(db) as con:
            for leftover in schema.leftovers:
                con.execute(f'DROP TABLE "{leftover}"')
        _migrate(db)
        repaired = _Schema(db)
        if not repaired.openable or repaired.leftovers or _shape(db) != _new_store_shape():
            raise TrackingError("its tables differ from a new store's after the migrations")
    except Exception as err:
        _copy(backup, db)
        backup.unlink()
        raise TrackingError(f"{db} is half-migrated ({schema.describe()}) and could not be "
                            f"repaired ({_first_line(err)}); it is unchanged; {_what_to_do(db)}") \
            from None
    _say(f"repaired {db} ({schema.describe()}): it is at {schema.head} now, and the file as "
         f"it was is kept in {backup.name}")


def _refuse_if_open(db: Path, what: str) -> None:
    """A TrackingError (one line) when another process has the store's files open."""
    holders = _open_elsewhere(db)
    if holders:
        raise TrackingError(f"{db} {what}, but {', '.join(holders)} has it open (an `mlflow "
                            f"ui` or `mlflow server`?); it is unchanged: stop that process, "
                            f"then run this again")


def _open_elsewhere(db: Path) -> list[str]:
    """Other processes with the store's files open, as "process <pid> (<name>)": those this
    user may look into (psutil reads /proc on Linux)."""
    import psutil

    files = {str(db), f"{db}-wal", f"{db}-shm"}
    found = []
    for process in psutil.process_iter(["pid", "name"]):
        if process.info["pid"] == os.getpid():
            continue
        try:
            if any(f.path in files for f in process.open_files()):
                found.append(f"process {process.info['pid']} ({process.info['name']})")
        except (psutil.Error, OSError):
            continue
    return found


def _what_to_do(db: Path) -> str:
    return f"move it aside (e.g. rename it {db.name}.broken) and run `ddpm tracking replay`"


def _copy(source: Path, dest: Path) -> None:
    """A consistent copy through sqlite's backup API (a plain copy could miss the WAL)."""
    with _connect(source) as src, _connect(dest) as dst:
        src.backup(dst)


def _shape(db: Path) -> dict[tuple[str, str], object]:
    """Tables with their columns (name, type, not null, primary key), and index names."""
    shape: dict[tuple[str, str], object] = {}
    with _connect(db) as con:
        for kind, name, table in con.execute(
                "SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"):
            if kind == "table":
                shape[kind, name] = sorted((c[1], c[2].upper(), c[3], c[5]) for c in
                                           con.execute(f'PRAGMA table_info("{name}")'))
            else:
                shape[kind, name] = table
    return shape


@functools.lru_cache(maxsize=1)  # seconds of migrations, the same for every repair
def _new_store_shape() -> dict[tuple[str, str], object]:
    with tempfile.TemporaryDirectory() as folder:
        reference = Path(folder) / "new.db"
        _migrate(reference)
        return _shape(reference)


def _use_wal(db: Path) -> None:
    """Switch to WAL (see the docstring), unless another process keeps it busy: the store
    then stays in rollback-journal mode, which is slower and as correct."""
    try:
        with _connect(db) as con:
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA busy_timeout = 5000")
                con.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError:
        pass
