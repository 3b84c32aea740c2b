"""The results store: every serving measurement hubc makes, as typed records in one SQLite file.

A record names what produced it (engine and version, server settings, the hardware actually used, the traffic or
text it was measured on) and what it measured (the checkpoint's path, a fingerprint of its files, the Hub id and
commit sha, hubc's recipe and target when the checkpoint came from `hubc optimize`). `hubc bench` and `hubc pick`
write and read it; a cost model reads it as data through `ResultsStore.records`.

The default file is `$HUBC_CACHE/results.sqlite`, else `$XDG_CACHE_HOME/hubc/results.sqlite` (~/.cache/hubc).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from advisor.measurement import (  # re-exported: the store's vocabulary
    LATENCY,
    QUALITY,
    CheckpointInfo,
    MeasurementRecord,
    fingerprint,
    hardware,
)
from serving.errors import ServingError

__all__ = [
    "LATENCY",
    "QUALITY",
    "CheckpointInfo",
    "Measurement",
    "MeasurementRecord",
    "ResultsStore",
    "StoreError",
    "current_records",
    "default_path",
    "describe",
    "fingerprint",
    "hardware",
    "latest_latency",
    "latest_quality",
    "same_version",
    "target_latency_records",
]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    model_id TEXT,
    revision TEXT,
    base_model_id TEXT,
    recipe TEXT,
    target TEXT,
    name TEXT,
    size_bytes INTEGER,
    traffic TEXT,
    metrics TEXT NOT NULL,
    hardware TEXT NOT NULL,
    engine TEXT NOT NULL,
    engine_version TEXT NOT NULL,
    settings TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
_INDEX = (
    "CREATE INDEX IF NOT EXISTS measurements_lookup ON measurements (fingerprint, kind, traffic, hardware)"
)
_COLUMNS = {
    line.split()[0]
    for line in _SCHEMA.split("CREATE TABLE IF NOT EXISTS measurements (")[1].split(");")[0].splitlines()
    if line.strip()
}


class StoreError(ServingError):
    """The results store cannot be opened or is of a newer schema than this hubc knows."""


def default_path() -> Path:
    """`$HUBC_CACHE/results.sqlite`, else `~/.cache/hubc/results.sqlite` (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("HUBC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hubc"
    )
    return Path(root) / "results.sqlite"


def describe(
    path: Path,
    model_id: str | None = None,
    revision: str | None = None,
    name: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> CheckpointInfo:
    """CheckpointInfo of a local checkpoint folder; reads hubc's report.json when the folder has one.

    `model_id`/`revision` (e.g. the repo id and sha a Hub download resolved to) win over report.json's source;
    `name` labels it in tables. A report.json that cannot be read is left out and reported in one line through
    `warn` (default: a Python warning), never silently.
    """
    path = Path(path).resolve()
    if not (path / "config.json").is_file():
        raise ServingError(f"{path} is not a checkpoint folder (no config.json)")
    report: dict[str, Any] = {}
    report_file = path / "report.json"
    if report_file.exists():
        problem = None
        try:
            loaded = json.loads(report_file.read_text())
            if isinstance(loaded, dict):
                report = loaded
            else:
                problem = "is not a JSON object"
        except (OSError, ValueError) as exc:
            problem = f"cannot be read ({' '.join(str(exc).split())})"
        if problem:
            message = f"{report_file} {problem}: its recipe, target and base model are left out"
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    source = report.get("source") if isinstance(report.get("source"), dict) else {}
    assert isinstance(source, dict)
    return CheckpointInfo(
        path=str(path),
        fingerprint=fingerprint(path),
        size_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
        model_id=model_id or source.get("hub_id"),
        revision=revision if model_id else source.get("revision"),
        base_model_id=source.get("hub_id"),
        base_path=source.get("path"),
        recipe=report.get("recipe") if isinstance(report.get("recipe"), dict) else None,
        target=report.get("target") if isinstance(report.get("target"), str) else None,
        name=name,
    )


# The store's record is hubc's one measurement record, under the name this module has always exported.
Measurement = MeasurementRecord


class ResultsStore:
    """A SQLite file of `Measurement`s. Open it with `ResultsStore(path)`; each call opens its own connection, so
    a store object can be shared by threads and processes (SQLite serialises writers)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of the results store {self.path}: {exc}") from exc
        with self._connect() as db:  # sqlite3 errors (e.g. not a database) become one-line StoreErrors
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"the results store {self.path} has schema version {row[0]}; this hubc reads "
                    f"up to {SCHEMA_VERSION}",
                    hint="upgrade hubc, or point HUBC_CACHE at another folder",
                )
            # Checked now, so a benchmark never runs only to find it cannot store its numbers.
            columns = {r[1] for r in db.execute("PRAGMA table_info(measurements)")}
            if missing := sorted(_COLUMNS - columns):
                raise StoreError(
                    f"the results store {self.path} lacks the columns {', '.join(missing)}",
                    hint="it was written by another hubc: move the file away to start a new store",
                )
            db.execute(_INDEX)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30.0)
            try:
                with db:  # commits, or rolls back on error
                    yield db
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StoreError(
                f"the results store {self.path} failed: {exc}",
                hint="move the file away to start a new store, or point HUBC_CACHE at another folder",
            ) from exc

    def add(self, measurement: Measurement) -> Measurement:
        """Store a measurement; returns it with `id` and `created_at` filled in."""
        created = measurement.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        info = measurement.checkpoint
        settings = measurement.settings
        server = settings.get("server") if isinstance(settings.get("server"), dict) else {}
        if measurement.dtype and "dtype" not in settings and "dtype" not in server:
            settings = {**settings, "dtype": measurement.dtype}  # the store keeps provenance in `settings`
        row = (
            measurement.kind, info.path, info.fingerprint, info.model_id, info.revision, info.base_model_id,
            _dump(info.recipe), info.target, info.name, info.size_bytes, measurement.traffic, _dump(measurement.metrics),
            measurement.hardware, measurement.engine, measurement.engine_version, _dump(settings),
            created,
        )  # fmt: skip
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO measurements (kind, checkpoint, fingerprint, model_id, revision, base_model_id, recipe,"
                " target, name, size_bytes, traffic, metrics, hardware, engine, engine_version, settings, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        measurement.id, measurement.created_at = cursor.lastrowid, created
        return measurement

    def records(
        self,
        kind: str | None = None,
        checkpoint: Path | str | None = None,
        fingerprint: str | None = None,
        traffic: str | None = None,
        hardware: str | None = None,
        engine_version: str | None = None,
    ) -> list[Measurement]:
        """Stored measurements matching every filter given, oldest first.

        `checkpoint` is a folder: it matches records of that folder's *current* fingerprint, so a checkpoint that
        was rewritten since does not get its old numbers. `traffic` is a canonical traffic string.
        """
        clauses, args = [], []
        if checkpoint is not None:
            fingerprint = _fingerprint_of(Path(checkpoint))
        for column, value in (
            ("kind", kind),
            ("fingerprint", fingerprint),
            ("traffic", traffic),
            ("hardware", hardware),
            ("engine_version", engine_version),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(f"SELECT * FROM measurements{where} ORDER BY id", args).fetchall()
        return [_from_row(row) for row in rows]


def same_version(stored: str, installed: str) -> bool:
    """Whether two vLLM versions are the same release (`0.32.0+cpu` is `0.32.0`)."""
    return stored.split("+")[0] == installed.split("+")[0]


def latest_latency(
    store: ResultsStore, info: CheckpointInfo, traffic: str, dtype: str, hw: str, version: str
) -> MeasurementRecord | None:
    """The latest latency of this checkpoint at the same traffic, hardware, server dtype and vLLM version."""
    matches = [
        r for r in store.records(kind=LATENCY, fingerprint=info.fingerprint, traffic=traffic, hardware=hw)
        if same_version(r.engine_version, version) and r.settings.get("server", {}).get("dtype") == dtype
    ]  # fmt: skip
    return matches[-1] if matches else None


def latest_quality(
    store: ResultsStore,
    info: CheckpointInfo,
    text: str,
    seq_len: int,
    windows: int,
    dtype: str,
    hw: str,
    version: str,
) -> MeasurementRecord | None:
    """The latest served perplexity of this checkpoint on the same text (its label: `wikitext2-test`, a file's
    name), windows, dtype, vLLM version and hardware (the kernels differ per ISA, and so does the served quality:
    int8 on AVX2 vs VNNI)."""
    matches = [
        r for r in store.records(kind=QUALITY, fingerprint=info.fingerprint, hardware=hw)
        if r.settings.get("text") == text and r.settings.get("seq_len") == seq_len
        and r.settings.get("windows") == windows and r.settings.get("dtype") == dtype
        and same_version(r.engine_version, version)
    ]  # fmt: skip
    return matches[-1] if matches else None


def current_records(records: list[MeasurementRecord]) -> tuple[list[MeasurementRecord], int]:
    """The records whose checkpoint folder still exists unchanged (its files still say what was measured), and
    how many were left out (removed or rewritten since)."""
    fresh = [
        r for r in records
        if Path(r.checkpoint.path).is_dir() and fingerprint(Path(r.checkpoint.path)) == r.checkpoint.fingerprint
    ]  # fmt: skip
    return fresh, len(records) - len(fresh)


def target_latency_records(store: ResultsStore, target: Any) -> tuple[list[MeasurementRecord], int]:
    """The stored latency records of an `advisor.targets.Target`'s hardware (`cpu`: this machine's, under the
    same environment), less those whose checkpoint folder was removed or rewritten since; and how many were left
    out for that."""
    from advisor.latency import measured_on

    if target.kind == "cpu":
        records = store.records(kind=LATENCY, hardware=hardware(env=target.serve_env))
    else:
        records = [r for r in store.records(kind=LATENCY) if measured_on(target, r.hardware)]
    return current_records(records)


def _fingerprint_of(path: Path) -> str:
    if not path.is_dir():
        raise ServingError(f"{path} is not a checkpoint folder")
    return fingerprint(path)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _from_row(row: sqlite3.Row) -> Measurement:
    info = CheckpointInfo(
        path=row["checkpoint"],
        fingerprint=row["fingerprint"],
        size_bytes=row["size_bytes"] or 0,
        model_id=row["model_id"],
        revision=row["revision"],
        base_model_id=row["base_model_id"],
        recipe=json.loads(row["recipe"]) if row["recipe"] else None,
        target=row["target"],
        name=row["name"],
    )
    return Measurement(
        kind=row["kind"],
        checkpoint=info,
        metrics=json.loads(row["metrics"]),
        hardware=row["hardware"],
        engine_version=row["engine_version"],
        settings=json.loads(row["settings"]),
        traffic=row["traffic"],
        engine=row["engine"],
        created_at=row["created_at"],
        id=row["id"],
    )
