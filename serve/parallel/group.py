"""The worker-group interface: one stage's ranks, driven by name, with the fan-out and rank-failure handling shared.

vLLM's executor is the model (`collective_rpc`): the driver runs a method by name on every rank with the same
inputs, waits for every answer and returns rank 0's. What can go wrong is handled here, once, for every transport:

    a rank raises      the call raises that exception (its type kept, a note naming the rank and its traceback);
                       the group stays usable if every other rank answered within `error_grace_s`
    a rank dies        WorkerDiedError naming the rank and how it ended
    a rank hangs       WorkerTimeoutError naming the ranks that did not answer (after `timeout_s`, or `error_grace_s`
                       after another rank failed: they are stuck in a collective the failed rank never joined)

A dead or hung rank breaks the group: the other ranks are stopped at once (their collectives can never complete, and
they hold devices), and every later call raises the same error again, so that a health check can report it.

Transports implement `_send` (start a call on every rank), `_receive` (answers that arrived) and `_stop`:
serve/parallel/process_group.py (spawned processes, no Ray) and deployments/worker_group.py (Ray actors in a
replica's placement group).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from serve.handoff import PromptEmbeds
from serve.parallel.config import ParallelConfig


class WorkerGroupError(RuntimeError):
    """The worker group is broken (a rank died or hung): it cannot run calls any more."""


class WorkerDiedError(WorkerGroupError):
    """A rank of a worker group ended (its process exited or its actor died)."""


class WorkerTimeoutError(WorkerGroupError, TimeoutError):
    """Ranks of a worker group did not answer in time."""


@dataclass(frozen=True)
class Returned:
    value: Any


@dataclass(frozen=True)
class Raised:
    error: BaseException
    traceback: str = ""


@dataclass(frozen=True)
class Died:
    how: str  # e.g. "pid 123, exit code -9"


Answer = Returned | Raised | Died


def to_cpu(value):
    """Tensors (also inside lists, tuples, dicts and PromptEmbeds) moved to the CPU: what crosses a process."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, PromptEmbeds):
        return value.to("cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    return value


def tensor_bytes(value) -> int:
    """Bytes of tensor data in `value` (also inside lists, tuples, dicts and PromptEmbeds)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, PromptEmbeds):
        return tensor_bytes([value.prompt, value.negative])
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


@dataclass
class Traffic:
    """What the driver has sent the ranks, per method: calls, and bytes of tensor data per rank."""

    calls: Counter = field(default_factory=Counter)
    tensor_bytes: Counter = field(default_factory=Counter)

    def record(self, method: str, args: tuple, kwargs: dict) -> None:
        self.calls[method] += 1
        self.tensor_bytes[method] += tensor_bytes(args) + tensor_bytes(kwargs)


class WorkerGroup(ABC):
    """A stage's ranks behind one interface: `execute(method, *args)` (rank 0's result), `execute_all` (every
    rank's), `check_health()`, `shutdown()`; `config`, `transformer_config`, `info` (each rank's READY answer)."""

    def __init__(self, config: ParallelConfig, transformer_config: dict, role: str, error_grace_s: float):
        self.config = config
        self.transformer_config = transformer_config
        self.role = role
        self.error_grace_s = error_grace_s
        self.traffic = Traffic()
        self.info: list[dict] = []
        self._lock = threading.Lock()  # one fan-out at a time: every rank must see calls in the same order
        self._broken: WorkerGroupError | None = None
        self._stopped = False

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @abstractmethod
    def _send(self, method: str, args: tuple, kwargs: dict) -> None:
        """Start `method(*args, **kwargs)` on every rank."""

    @abstractmethod
    def _receive(self, pending: set[int], timeout_s: float | None) -> list[tuple[int, Answer]]:
        """Answers of ranks in `pending` that have arrived, waiting up to `timeout_s` (None: no limit) for the first;
        may return none before the timeout (the caller loops)."""

    @abstractmethod
    def _stop(self, graceful: bool, timeout_s: float) -> None:
        """End every rank: graceful, each tears its process groups down first; else at once."""

    def execute(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        """Run `method(*args, **kwargs)` on every rank; rank 0's result."""
        return self.execute_all(method, *args, timeout_s=timeout_s, **kwargs)[0]

    def execute_all(self, method: str, *args, timeout_s: float | None = None, **kwargs) -> list:
        """Run `method(*args, **kwargs)` on every rank; every rank's result, in rank order."""
        with self._lock:
            self.check_health()
            self.traffic.record(method, args, kwargs)
            self._send(method, args, kwargs)
            return self._gather(method, timeout_s)

    def check_health(self) -> None:
        """Raise if the group cannot run calls any more: the error that broke it, again, or RuntimeError if shut
        down."""
        if self._broken is not None:
            raise type(self._broken)(*self._broken.args)
        if self._stopped:
            raise RuntimeError(f"the {self.role} worker group is shut down")

    def _start(self, timeout_s: float) -> list:
        """Every rank's READY answer (the call `_send` or the constructor started); on any failure, no rank is left."""
        try:
            return self._gather("start", timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _gather(self, what: str, timeout_s: float | None) -> list:
        pending = set(range(self.world_size))
        results: dict[int, Any] = {}
        errors: dict[int, Raised] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        grace = False
        while pending:
            if errors and not grace:
                grace = True
                end = time.monotonic() + self.error_grace_s
                deadline = end if deadline is None else min(deadline, end)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            for rank, answer in self._receive(pending, left):
                pending.discard(rank)
                if isinstance(answer, Died):
                    raise self._break(WorkerDiedError(
                        f"{self.role} worker rank {rank} died during {what!r} ({answer.how}); the worker group is "
                        f"broken and its other ranks have been stopped"
                    ))
                if isinstance(answer, Raised):
                    errors[rank] = answer
                else:
                    results[rank] = answer.value
        if errors:
            rank = min(errors)
            error = errors[rank].error
            error.add_note(f"raised on {self.role} worker rank {rank} during {what!r}:\n{errors[rank].traceback}")
            if pending:
                self._break(WorkerTimeoutError(
                    f"{self.role} worker ranks {sorted(pending)} did not answer {what!r} within {self.error_grace_s} s "
                    f"of rank {rank} raising {type(error).__name__}: {error} (stuck in a collective it never joined); "
                    f"the worker group is broken and its ranks have been stopped"
                ))
            raise error
        if pending:
            raise self._break(WorkerTimeoutError(
                f"{self.role} worker ranks {sorted(pending)} did not answer {what!r} within {timeout_s} s; the worker "
                f"group is broken and its ranks have been stopped"
            ))
        return [results[r] for r in range(self.world_size)]

    def _break(self, error: WorkerGroupError) -> WorkerGroupError:
        """Mark the group broken by `error` (kept for every later call) and stop the ranks that are left."""
        self._broken = error
        if not self._stopped:
            self._stopped = True
            self._stop(graceful=False, timeout_s=0.0)
        return error

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Tear down every rank's process groups, then end the ranks. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop(graceful=True, timeout_s=timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        if not getattr(self, "_stopped", True):
            self.shutdown()
