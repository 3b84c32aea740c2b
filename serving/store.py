"""The results store: every serving measurement hubc makes, as typed records in one SQLite file.

A record names what produced it (engine and version, server settings, the hardware actually used, the traffic or
text it was measured on) and what it measured (the checkpoint's path, a fingerprint of its files, the Hub id and
commit sha, hubc's recipe and target when the checkpoint came from `hubc optimize`). `hubc bench` and `hubc pick`
write and read it; a cost model reads it as data through `ResultsStore.records`.

The default file is `$HUBC_CACHE/results.sqlite`, else `$XDG_CACHE_HOME/hubc/results.sqlite` (~/.cache/hubc).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.errors import ServingError

SCHEMA_VERSION = 1
LATENCY = "latency"
QUALITY = "quality"

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


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: where it lies, a fingerprint of its files, and where it came from when known."""

    path: str
    """Absolute path of the checkpoint folder."""
    fingerprint: str
    """sha256 (16 hex digits) over config.json, the safetensors index and each safetensors file's name, size and
    mtime: changes whenever the checkpoint is rewritten, so stale measurements are never reused for it."""
    size_bytes: int
    """Bytes of safetensors weights on disk."""
    model_id: str | None = None
    """Hub repo id of this checkpoint when it was pulled from the Hub; for a `hubc optimize` output, the Hub id of
    the model it was made from (report.json `source.hub_id`)."""
    revision: str | None = None
    """Commit sha that `model_id` was read at, when known."""
    base_model_id: str | None = None
    """Hub id of the model this checkpoint was compressed from (hubc's report.json), when known."""
    base_path: str | None = None
    """Local folder of that base model as recorded in report.json (may no longer exist)."""
    recipe: dict[str, Any] | None = None
    """hubc's recipe (report.json `recipe`), for checkpoints made by `hubc optimize`."""
    target: str | None = None
    """hubc's target name (report.json `target`)."""
    name: str | None = None
    """What the user called it (a Hub repo id, `demo`), when the folder name says less (a Hub snapshot folder is
    named after its commit sha)."""

    @property
    def label(self) -> str:
        """Short name for tables and plots: `name`, else the folder name."""
        return self.name or Path(self.path).name


def fingerprint(path: Path) -> str:
    """Content fingerprint of a checkpoint folder (config.json bytes, index bytes, safetensors names/sizes/mtimes)."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    for file in sorted(path.glob("*.safetensors")):
        stat = file.stat()  # follows HF-cache symlinks to the blob
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def describe(
    path: Path, model_id: str | None = None, revision: str | None = None, name: str | None = None
) -> CheckpointInfo:
    """CheckpointInfo of a local checkpoint folder; reads hubc's report.json when the folder has one.

    `model_id`/`revision` (e.g. the repo id and sha a Hub download resolved to) win over report.json's source;
    `name` labels it in tables.
    """
    path = Path(path).resolve()
    if not (path / "config.json").is_file():
        raise ServingError(f"{path} is not a checkpoint folder (no config.json)")
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((path / "report.json").read_text())
        report = loaded if isinstance(loaded, dict) else {}
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


def hardware() -> str:
    """The hardware a CPU server actually runs on: CPU model, the threads this process may use, and the vector ISA
    that decides which vLLM kernels run (AMX, AVX-512 VNNI, AVX-512, AVX2)."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == (platform.processor() or platform.machine()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    isa = [
        label
        for label, flag in (
            ("AMX", "amx_tile"),
            ("AVX-512", "avx512f"),
            ("VNNI", "avx512_vnni"),
            ("BF16", "avx512_bf16"),
        )
        if flag in flags
    ] or (["AVX2"] if "avx2" in flags else [])
    return f"{name}, {threads} threads" + (f", {' '.join(isa)}" if isa else "")


@dataclass
class Measurement:
    """One stored measurement of one checkpoint, with its provenance."""

    kind: str
    """`latency` (a `vllm bench serve` run; `traffic` set) or `quality` (served perplexity; `settings` name the
    text and windows)."""
    checkpoint: CheckpointInfo
    """The checkpoint measured."""
    metrics: dict[str, Any]
    """The numbers: for latency ttft/tpot/itl p50/p95 (ms, median over rounds), output and request throughput
    (tok/s, req/s: the median, and p50/p95 across rounds; older records lack the p50/p95 keys, and
    `serving.bench.stored_throughput` computes them from their rounds), peak memory (MiB), per-round values and
    their spread; for quality perplexity and scored tokens. Keys are only ever added to this JSON object, so older
    stores stay readable."""
    hardware: str
    """Hardware actually used (`hardware()` for CPU servers)."""
    engine_version: str
    """vLLM version of the server that produced the numbers."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Server settings (dtype, max_model_len, KV cache, eager, threads) and measurement settings (prompts, rounds,
    seed, text, windows)."""
    traffic: str | None = None
    """Traffic profile of a latency measurement, canonical `in=512,out=128,concurrency=8`."""
    engine: str = "vllm"
    """Engine that served the requests."""
    created_at: str = ""
    """UTC time the record was stored (ISO 8601)."""
    id: int | None = None
    """Row id once stored."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON output."""
        return asdict(self)


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
        row = (
            measurement.kind, info.path, info.fingerprint, info.model_id, info.revision, info.base_model_id,
            _dump(info.recipe), info.target, info.name, info.size_bytes, measurement.traffic, _dump(measurement.metrics),
            measurement.hardware, measurement.engine, measurement.engine_version, _dump(measurement.settings),
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
