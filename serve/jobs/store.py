"""Where job records live: one table in a SQL database, through SQLAlchemy Core.

    sqlite:///DATA_DIR/jobs.db                     the embedded default: a file, no server (one node)
    postgresql+psycopg://host:5432/db              a server database, for clusters (`pip install ".[postgres]"`)

One implementation serves both, because SQLAlchemy already abstracts the dialects; what it does not offer is the job
protocol on top, written here:

- `update(job_id, change)` is a compare-and-set on the record's version (optimistic concurrency): the orchestrator,
  the stage replicas (progress) and the ingress (cancel) all write the same record from different processes and
  never overwrite each other's change; a lost race re-reads and re-applies `change`.
- `claim(worker, lease_s)` hands unfinished jobs whose lease is free or expired to an orchestrator replica, by the
  same compare-and-set, so that exactly one replica drives a job at a time and a dead replica's jobs are taken over
  once its lease expires (leases compare wall clocks, so nodes need NTP-synchronised clocks).

The whole record is stored as JSON; the columns that queries filter or sort on (status, owner, created_at, lease)
are copies of its fields, written together with it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from serve.jobs.state import TERMINAL, JobRecord
from serve.priority import DEFAULT_PRIORITY, Waiting, order


@dataclass(frozen=True)
class _Claimable(Waiting):
    job_id: str = ""


class StoreConflict(RuntimeError):
    """A record kept changing under `update` for longer than its retries allow."""


def default_store_url(data_dir: str | os.PathLike) -> str:
    path = Path(data_dir).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'jobs.db'}"


class JobStore:
    """Job records in table `table` of the database at `url` (created if missing)."""

    def __init__(self, url: str, table: str = "srd_jobs"):
        self.url = url
        self._engine = self._connect(url)
        metadata = sa.MetaData()
        self._jobs = sa.Table(
            table, metadata,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("owner", sa.String(64), nullable=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("lease_owner", sa.String(128), nullable=True),
            sa.Column("lease_expires_at", sa.Float, nullable=True),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("record", sa.Text, nullable=False),
            sa.Index(f"{table}_status_created", "status", "created_at"),
            sa.Index(f"{table}_owner_created", "owner", "created_at"),
        )
        metadata.create_all(self._engine)  # CREATE TABLE IF NOT EXISTS: every replica may race to do it

    @staticmethod
    def _connect(url: str) -> sa.Engine:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @sa.event.listens_for(engine, "connect")
            def _pragmas(connection, _):  # readers never block the writer; writers wait instead of failing
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

            return engine
        return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)

    def close(self) -> None:
        self._engine.dispose()

    def drop(self) -> None:
        """Remove the table (tests clean up after themselves)."""
        self._jobs.drop(self._engine, checkfirst=True)

    # -- writes -------------------------------------------------------------------------------------------------

    def _columns(self, job: JobRecord) -> dict:
        return {"owner": job.owner, "status": job.status, "created_at": job.created_at,
                "lease_owner": job.lease_owner, "lease_expires_at": job.lease_expires_at,
                "version": job.version, "record": job.model_dump_json()}

    def create(self, job: JobRecord) -> JobRecord:
        with self._engine.begin() as connection:
            connection.execute(self._jobs.insert().values(id=job.id, **self._columns(job)))
        return job

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None],
               retries: int = 50) -> JobRecord | None:
        """Apply `change` to the current record and store it unless someone else changed it meanwhile (then
        re-read and re-apply). `change` returns the new record, or None to leave it as it is. Returns the stored
        record (None if there is no such job)."""
        for _ in range(retries):
            job = self.get(job_id)
            if job is None:
                return None
            changed = change(job)
            if changed is None or changed == job:
                return job
            changed = changed.model_copy(update={"version": job.version + 1})
            with self._engine.begin() as connection:
                result = connection.execute(
                    self._jobs.update()
                    .where(self._jobs.c.id == job_id, self._jobs.c.version == job.version)
                    .values(**self._columns(changed))
                )
            if result.rowcount == 1:
                return changed
        raise StoreConflict(f"video job {job_id} changed {retries} times while being updated")

    def delete(self, job_id: str) -> bool:
        with self._engine.begin() as connection:
            return connection.execute(self._jobs.delete().where(self._jobs.c.id == job_id)).rowcount == 1

    def claim(self, worker: str, lease_s: float, limit: int, now: float | None = None,
              aging_s: float | None = None) -> list[JobRecord]:
        """Up to `limit` unfinished jobs whose lease is free or expired, now leased to `worker`: oldest first, or
        with `aging_s`, by latency class and then age (serve/priority.py `order`, the class rising with the time
        since the job's creation)."""
        now = time.time() if now is None else now
        jobs = self._jobs.c
        free = sa.and_(jobs.status.in_(("queued", "in_progress")),
                       sa.or_(jobs.lease_expires_at.is_(None), jobs.lease_expires_at < now, jobs.lease_owner == worker))
        with self._engine.connect() as connection:
            if aging_s is None:
                query = sa.select(jobs.id).where(free).order_by(jobs.created_at).limit(limit)
                candidates = list(connection.execute(query).scalars())
            else:  # the class is in the record alone: read the free jobs', order them here
                rows = connection.execute(sa.select(jobs.id, jobs.created_at, jobs.record).where(free))
                waiting = [_Claimable(json.loads(record)["request"].get("priority", DEFAULT_PRIORITY), created, id_)
                           for id_, created, record in rows]
                candidates = [w.job_id for w in order(waiting, now, aging_s)[:limit]]
        claimed = []
        for job_id in candidates:
            def take(job: JobRecord) -> JobRecord | None:
                free = job.lease_expires_at is None or job.lease_expires_at < now or job.lease_owner == worker
                if job.terminal or not free:
                    return None
                return job.model_copy(update={"lease_owner": worker, "lease_expires_at": now + lease_s})

            job = self.update(job_id, take)
            if job is not None and job.lease_owner == worker and not job.terminal:
                claimed.append(job)
        return claimed

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend `worker`'s lease on the job; False if the job is gone, finished or leased to another worker."""
        def extend(job: JobRecord) -> JobRecord | None:
            if job.lease_owner != worker or job.terminal:
                return None
            return job.model_copy(update={"lease_expires_at": time.time() + lease_s})

        job = self.update(job_id, extend)
        return job is not None and job.lease_owner == worker and not job.terminal

    # -- reads --------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._engine.connect() as connection:
            row = connection.execute(sa.select(self._jobs.c.record).where(self._jobs.c.id == job_id)).first()
        return None if row is None else JobRecord.model_validate_json(row[0])

    def get_many(self, job_ids: list[str]) -> dict[str, JobRecord]:
        if not job_ids:
            return {}
        with self._engine.connect() as connection:
            rows = connection.execute(sa.select(self._jobs.c.record).where(self._jobs.c.id.in_(job_ids)))
            return {job.id: job for job in (JobRecord.model_validate_json(r[0]) for r in rows)}

    def list(self, owner: str | None = None, limit: int = 20, after: str | None = None,
             order: str = "desc") -> tuple[list[JobRecord], bool]:
        """A page of jobs by creation time (`order` asc or desc), after the job `after`; returns (jobs, has_more).
        With `owner`, only that owner's jobs."""
        jobs = self._jobs.c
        query = sa.select(jobs.record)
        if owner is not None:
            query = query.where(jobs.owner == owner)
        if after is not None:
            with self._engine.connect() as connection:
                anchor = connection.execute(sa.select(jobs.created_at).where(jobs.id == after)).scalar()
            if anchor is None:
                raise KeyError(after)
            # (created_at, id) orders jobs totally, so a page boundary never skips or repeats a job
            key = sa.tuple_(jobs.created_at, jobs.id)
            query = query.where(key > (anchor, after) if order == "asc" else key < (anchor, after))
        ordering = (jobs.created_at.asc(), jobs.id.asc()) if order == "asc" else (jobs.created_at.desc(),
                                                                                  jobs.id.desc())
        with self._engine.connect() as connection:
            rows = list(connection.execute(query.order_by(*ordering).limit(limit + 1)).scalars())
        return [JobRecord.model_validate_json(r) for r in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[JobRecord]:
        """Every job queued or in progress (at most `jobs.max_unfinished_jobs`), oldest first."""
        with self._engine.connect() as connection:
            rows = connection.execute(sa.select(self._jobs.c.record).where(
                self._jobs.c.status.not_in(tuple(TERMINAL))).order_by(self._jobs.c.created_at))
            return [JobRecord.model_validate_json(r[0]) for r in rows]

    def count_unfinished(self) -> int:
        """Jobs queued or in progress: what the admission bound counts."""
        with self._engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(self._jobs)
                .where(self._jobs.c.status.not_in(tuple(TERMINAL)))
            ).scalar_one()
