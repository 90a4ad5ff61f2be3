"""A stage's worker group as N spawned processes on this host (tests, CPU, or a GPU host without Ray).

Each rank is a `multiprocessing` process (spawn) running `_rank_main`: it builds its worker, answers READY, then
runs (method, args, kwargs) messages from its pipe until "shutdown". The driver watches every rank's pipe and process
sentinel together, so a rank that exits is seen at once (WorkerGroup turns it into WorkerDiedError). Written here
because the standard library gives the pipes and sentinels but no call-by-name over a group; Ray's actors are the
other transport (deployments/worker_group.py), for replicas.
"""

from __future__ import annotations

import multiprocessing.connection
import pickle
import time
import traceback

import torch

from serve.parallel.config import ParallelConfig, check_parallel, load_transformer_config
from serve.parallel.context import free_port
from serve.parallel.group import Answer, Died, Raised, Returned, WorkerGroup, to_cpu
from serve.parallel.worker import ParallelWorker


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it pickles (so a ValueError stays a ValueError in the driver), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _rank_main(conn, worker_kwargs: dict, worker_cls: type[ParallelWorker] = ParallelWorker) -> None:
    """A spawned rank: build the worker, answer READY, then run (method, args, kwargs) messages until shutdown."""
    try:
        worker = worker_cls(**worker_kwargs)
        conn.send(("ok", worker.ready()))
    except BaseException as e:  # report, then exit: the driver raises it
        conn.send(("error", _portable(e), traceback.format_exc()))
        return
    while True:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:  # driver gone
            break
        try:
            conn.send(("ok", to_cpu(getattr(worker, method)(*args, **kwargs))))
        except BaseException as e:
            conn.send(("error", _portable(e), traceback.format_exc()))
        if method == "shutdown":
            break


class ProcessWorkerGroup(WorkerGroup):
    """N spawned rank processes. Validates the degrees against the model before spawning and waits for every rank's
    READY. `worker_cls` (a ParallelWorker subclass, importable by the spawned ranks) is vLLM's `worker_cls`:
    benchmarks use it to seed and time the ranks."""

    def __init__(
        self, engine_config, parallel_config: ParallelConfig, role: str = "sketch", devices: list[str] | None = None,
        num_threads: int | None = None, start_timeout_s: float = 600.0, error_grace_s: float = 30.0,
        worker_cls: type[ParallelWorker] = ParallelWorker,
    ):
        transformer_config = load_transformer_config(engine_config, role)
        check_parallel(parallel_config, transformer_config, role=role)
        n = parallel_config.world_size
        if devices is None:
            devices = [f"cuda:{r}" for r in range(n)] if engine_config.device.startswith("cuda") else ["cpu"] * n
        if len(devices) != n:
            raise ValueError(f"{len(devices)} devices given for a group of {n} ranks")
        super().__init__(parallel_config, transformer_config, role, error_grace_s)
        ctx = torch.multiprocessing.get_context("spawn")
        port = free_port()
        self._conns, self.processes = [], []
        for rank in range(n):
            parent, child = ctx.Pipe()
            kwargs = dict(
                rank=rank, world_size=n, master_addr="127.0.0.1", master_port=port, engine_config=engine_config,
                parallel_config=parallel_config, role=role, device=devices[rank], num_threads=num_threads,
            )
            process = ctx.Process(
                target=_rank_main, args=(child, kwargs, worker_cls), daemon=True, name=f"srd-{role}-rank{rank}"
            )
            process.start()
            child.close()
            self._conns.append(parent)
            self.processes.append(process)
        self.info = self._start(start_timeout_s)

    @property
    def world_size(self) -> int:
        return len(self.processes)

    def _send(self, method: str, args: tuple, kwargs: dict) -> None:
        message = (method, to_cpu(args), to_cpu(kwargs))
        for conn in self._conns:
            conn.send(message)

    def _receive(self, pending: set[int], timeout_s: float | None) -> list[tuple[int, Answer]]:
        by_conn = {self._conns[r]: r for r in pending}
        by_sentinel = {self.processes[r].sentinel: r for r in pending}
        ready = multiprocessing.connection.wait([*by_conn, *by_sentinel], timeout=timeout_s)
        answers: dict[int, Answer] = {}
        for rank in sorted({by_conn.get(obj, by_sentinel.get(obj)) for obj in ready}):
            conn, process = self._conns[rank], self.processes[rank]
            try:
                if conn.poll():  # a rank may answer and then exit (shutdown): the answer counts
                    status, *payload = conn.recv()
                    answers[rank] = Returned(payload[0]) if status == "ok" else Raised(*payload)
                    continue
            except (EOFError, OSError):
                pass
            if not process.is_alive():
                answers[rank] = Died(f"pid {process.pid}, exit code {process.exitcode}")
        return list(answers.items())

    def _stop(self, graceful: bool, timeout_s: float) -> None:
        if graceful:
            for conn, process in zip(self._conns, self.processes):
                if process.is_alive():
                    try:
                        conn.send(("shutdown", (), {}))
                    except (BrokenPipeError, OSError):
                        pass
            deadline = time.monotonic() + timeout_s
            for process in self.processes:
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in self._conns:
            conn.close()
