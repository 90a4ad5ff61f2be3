"""The ordering rule the simulator takes as a plain function, named in its config (`priority_rule`).

A priority rule gives a waiting item (a queued job, a call at a handle, a call in a replica's batch queue) its sort
key: lower runs first. The app orders all three FIFO today (the store claims the oldest job first, Serve's handle
and `@serve.batch` queues are FIFO), which `fifo` is. Latency classes (issue 26, not built yet) would put their rule
in the app and name it here; preemption at step boundaries is not simulated. Load-elastic switching has no plug yet
for the same reason: there is no app code for it to call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Waiting:
    """What a priority rule sees of one waiting item."""

    job_id: int
    priority: int  # the request's (higher: more urgent)
    klass: str
    created: float  # the job's arrival
    queued: float  # when it joined this queue


def fifo(item: Waiting) -> tuple:
    """The app's order: first come, first served (the store claims by created_at; Serve's queues are FIFO)."""
    return (item.queued, item.job_id)


def by_priority(item: Waiting) -> tuple:
    """Higher priority first, FIFO within one (no preemption: a running batch finishes)."""
    return (-item.priority, item.queued, item.job_id)


def load_rule(spec: str) -> Callable[..., Any]:
    """`module:function` -> the function; a ValueError names the spec."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"rule {spec!r} cannot be loaded ({e}); expected module:function") from None
