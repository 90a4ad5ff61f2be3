"""Where jobs and their files live and how faults are survived: the `jobs` section of the app config."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.priority import ClassesConfig


def default_data_dir() -> str:
    return os.environ.get("SRD_DATA_DIR") or str(Path("~/.local/share/srd").expanduser())


class JobsConfig(BaseModel):
    """Where jobs and their files live, and how faults are survived. Every replica opens the store and the results
    location itself: no actor holds job state, so any replica may die without losing a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: str = Field(default_factory=default_data_dir,
                          description="Directory of the embedded store and the default results location "
                          "($SRD_DATA_DIR, else ~/.local/share/srd).")
    store_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store. Default: an SQLite file in `data_dir` (one node); for "
        "a cluster a server database, e.g. postgresql+psycopg://user@host:5432/srd.")
    store_table: str = Field("srd_jobs", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
                             description="Table of the job records.")
    results_url: str | None = Field(
        None, description="Where videos, previews, latents and hand-off checkpoints go: a directory or an fsspec "
        "URL (s3://bucket/srd for a cluster). Default: `data_dir`/results.")
    max_attempts: int = Field(3, ge=1, description="Attempts per stage before the job fails.")
    lease_s: float = Field(30.0, gt=0, description="An orchestrator's hold on a job; once it expires (its holder "
                                                   "died), another replica takes the job over.")
    poll_interval_s: float = Field(0.2, gt=0, description="How often an orchestrator looks for jobs to drive.")
    progress_interval_s: float = Field(
        0.1, gt=0, description="How often a stage replica writes step progress and reads cancel flags, off the "
        "denoising thread (a step never waits on the store): a cancel stops the job at the first step boundary "
        "after the next read, i.e. within one step wherever a step takes longer than this.")
    max_unfinished_jobs: int = Field(1000, ge=1, description="Queued plus running jobs; beyond it POST /v1/videos "
                                                             "answers 429 with Retry-After.")
    retry_after_s: int = Field(30, ge=1, description="Retry-After of a 429.")
    classes: ClassesConfig = Field(default_factory=ClassesConfig, description="Latency classes: the default class, "
                                   "aging, preemption and load-elastic switching (serve/priority.py).")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:  # resolved where the config is made, so every replica agrees
        return str(Path(value).expanduser().absolute())

    @property
    def store(self) -> str:
        from serve.jobs.store import default_store_url

        return self.store_url or default_store_url(self.data_dir)

    @property
    def results(self) -> str:
        return self.results_url or str(Path(self.data_dir) / "results")
