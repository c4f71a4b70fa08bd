"""Run a function in N gloo ranks on this machine and bring each rank's result back (a test helper, not a test).

    results = run_in_processes(check_tp2, 2, seed=7)   # check_tp2(rank, seed=7) runs in ranks 0 and 1

`fn` must be a module-level function of an importable module (spawned children import it by name). Each child
gets the parent's `sys.path` (multiprocessing's spawn preparation copies it before `fn` is unpickled), a gloo
process group of `nprocs` ranks on a free localhost port, the torchrun-style env vars (`RANK`, `WORLD_SIZE`,
`MASTER_ADDR`, ...) and the CPU support patches; `fn` then sets up model parallelism itself, usually with
`megatron_bdgemma.runtime.distributed.init_distributed`. Return values must be picklable.

The ranks are forked from a `forkserver` process that imported torch, megatron-core, transformers and this project
once (`PRELOAD`), instead of each starting an interpreter and importing them (about 9 CPU s per rank, most of a
small multi-rank test's cost). A child still behaves as a spawned one: a fresh process that has run no torch op, with
the parent's `sys.path`, working directory and (`os.environ`) environment at the call; what a library reads from the
environment only when it is imported, or the C library at process start, comes from the environment the server
started with (the first call's), as it does in the parent process.

A child that raises fails the call with the child's traceback in the message. The other ranks are then killed
rather than awaited, since they are typically blocked in a collective that will never complete; a child that dies
without reporting, or a run past `timeout_s`, fails the same way. Each rank leads its own process group, so the
kill also reaches anything it started, which would otherwise outlive a killed rank.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_bdgemma.runtime.distributed import destroy_distributed, free_port


class ChildProcessFailed(RuntimeError):
    """A rank raised, died or timed out; the message carries the rank's traceback when there is one."""


PRELOAD = ("torch", "torch.distributed", "megatron.core", "transformers", "megatron_bdgemma.training.trainer")
"""Imported once by the fork server (a module that fails to import is skipped there and imported by the child)."""


def _child(rank: int, nprocs: int, port: int, call: bytes, results: Any, environ: dict[str, str]) -> None:
    os.setpgid(0, 0)  # see the module docstring: lets the parent kill this rank together with its children
    try:
        fn, args, kwargs = pickle.loads(call)
        os.environ.clear()
        os.environ.update(environ)  # the caller's, not the fork server's (see the module docstring)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
        # One thread, like the test process itself (tests/conftest.py): results then do not depend on the core count.
        torch.set_num_threads(1)
        from megatron_bdgemma.runtime.cpu_support import apply_cpu_support

        apply_cpu_support()
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=nprocs)
        # Pickled here with the plain pickler: torch.multiprocessing's queue would pass tensors as shared-memory
        # handles, which are invalid once this process exits.
        payload = ("ok", pickle.dumps(fn(rank, *args, **kwargs)))
    except BaseException:  # noqa: BLE001 - anything, so the parent never waits for a report that will not come
        payload = ("error", traceback.format_exc())
    results.put((rank, *payload))
    if payload[0] == "ok":
        destroy_distributed()


def run_in_processes(fn: Callable[..., Any], nprocs: int = 2, *args: Any, timeout_s: float = 180.0,
                     **kwargs: Any) -> list[Any]:
    """Run `fn(rank, *args, **kwargs)` in `nprocs` spawned gloo ranks; return the results in rank order.

    `timeout_s` bounds the whole run (it is not passed to `fn`). Raises `ChildProcessFailed` if a rank raises
    (first error reported, with its traceback), exits without a result, or the run times out.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts (the first call)
    results = context.Queue()
    port = free_port()
    # The call's arguments go pickled with the plain pickler, as the results come back: torch.multiprocessing would
    # pass each tensor as a shared-memory file descriptor, and the fork server passes at most 256 descriptors.
    call, environ = pickle.dumps((fn, args, kwargs)), dict(os.environ)
    processes = [context.Process(target=_child, args=(rank, nprocs, port, call, results, environ),
                                 name=f"{fn.__name__}-rank{rank}") for rank in range(nprocs)]
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for process in processes:
            process.start()
        while len(outputs) < nprocs:
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise ChildProcessFailed(f"{fn.__name__}: timed out after {timeout_s:.0f} s; "
                                             f"ranks {sorted(set(range(nprocs)) - outputs.keys())} did not report")
                # A rank that exited without reporting (killed, segfault) can never report: fail now.
                dead = [r for r, p in enumerate(processes) if r not in outputs and p.exitcode is not None]
                if dead and results.empty():
                    codes = {r: processes[r].exitcode for r in dead}
                    raise ChildProcessFailed(f"{fn.__name__}: rank(s) {dead} exited without a result "
                                             f"(exit codes {codes})")
                continue
            if status == "error":
                raise ChildProcessFailed(f"{fn.__name__} failed on rank {rank}:\n{payload}")
            outputs[rank] = pickle.loads(payload)
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in [p for p in processes if p.pid is not None]:
            with contextlib.suppress(ProcessLookupError):  # an empty group: the rank and its children are gone
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()  # in case it was killed before it could make its own group
            process.join()
        results.close()
    return [outputs[rank] for rank in range(nprocs)]
