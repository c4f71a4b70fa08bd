"""How every command-line entry point ends: an error is one line on stderr, printed once, and a documented exit code.

    @entry_point
    def main(argv=None) -> int: ...        # an exit code, or None for 0

    if __name__ == "__main__":
        sys.exit(main())

An exception that reaches `main` becomes `error: <message>` on stderr and an exit code instead of a traceback on
every rank. The message is the exception's own for ValueError / OSError (this project's named errors) and for any
exception class with an `exit_code`; anything else is shown with its class name and where to get the traceback.
Exit codes:

| code | meaning |
|---:|---|
| 0 | done |
| 1 | error (the message says what); also the converters' "`--verify` above tolerance" |
| 2 | bad input, where an entry point reports it so (`report_error`: the converters); argparse's usage errors |
| 3 | the training run diverged: a non-finite loss or gradient stopped it before the update (`NonFiniteError`) |
| 130 | interrupted (KeyboardInterrupt reached `main`: one line from rank 0, no waiting for peers) |
| other | an exception class with an integer `exit_code` attribute exits with it (e.g. the trainer's stops) |

`SystemExit` passes through unchanged. `BDGEMMA_TRACEBACK=1` prints each failing rank's traceback before the line.

**Which rank prints.** Under torchrun every rank runs `main`, and most errors (a bad config, a missing file) hit
every rank alike. One line comes from rank 0 when every rank hit the same error, otherwise a line from each rank
whose message differs from rank 0's, naming it (`error: rank 3: ...`). To know which case it is, the failing ranks
compare messages through the launcher's key-value store (torchrun's agent store, or rank 0's under a plain
`env://` launch: `MASTER_ADDR:MASTER_PORT`), with every wait bounded (`PEER_WAIT_S`), never through a collective
of the process group: a rank that did not fail is typically blocked in a collective and would never join one.
So an error that only some ranks hit is printed after at most `2 * PEER_WAIT_S` seconds, and the exchange cannot
hang. Rank 0 waits for the others' messages before it prints, and every rank that stays silent waits until rank 0
has printed: torchrun kills the remaining ranks as soon as one exits with an error, so a rank must not exit before
the line it relies on is out (it stays `LINGER_S` longer, so that rank 0 exits first and is torchrun's "root
cause"). Without a reachable store, rank 0 prints and the other ranks print naming themselves.

torchrun itself then reports that the job failed (its `ChildFailedError` summary, printed by the launcher process
for any non-zero exit of a rank); the summary's `traceback` field carries the same one line (written to the error
file torchrun gives each rank), not "To enable traceback see ...".
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "BDGEMMA_TRACEBACK"
PEER_WAIT_S = 5.0
"""How long rank 0 waits for the other ranks' messages; the others wait twice as long for rank 0's."""
LINGER_S = 2.0
"""How long a rank whose error rank 0 printed stays after it, so that rank 0 exits first."""

_NAMED = (ValueError, OSError)
"""Errors this project raises on purpose, with messages that name what is wrong: printed without their class name
(as is any exception with an `exit_code`)."""

F = TypeVar("F", bound=Callable[..., Any])


def entry_point(main: F) -> F:
    """Decorate a command's `main`: it then returns an exit code instead of raising (see the module docstring)."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            code = main(*args, **kwargs)
        except KeyboardInterrupt:
            # Every rank gets the interrupt: rank 0 says so, and nobody waits for a peer.
            if process_rank() == 0:
                print("error: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as error:  # noqa: BLE001 - torch's CheckpointException is a BaseException
            code = _exit_code_of(error)
            return report_error(error, EXIT_ERROR if code is None else code)
        return 0 if code is None else int(code)

    return run  # type: ignore[return-value]


def process_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else the launcher's `RANK` (0 alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _exit_code_of(error: BaseException) -> int | None:
    """The exit code an exception class of this project asks for (its `exit_code` attribute), if any."""
    code = getattr(error, "exit_code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def error_message(error: BaseException) -> str:
    """The message of `error` as the line shows it: a named error's own message; anything else with its class
    name and where to find the traceback."""
    text = str(error).strip()
    if (isinstance(error, _NAMED) or _exit_code_of(error) is not None) and text:
        return text
    return f"{type(error).__name__}{': ' + text if text else ''} ({TRACEBACK_ENV}=1 prints the traceback)"


def report_error(error: BaseException, code: int) -> int:
    """Print `error` once for the whole job (see the module docstring) and return `code`."""
    rank, world = process_rank(), _world_size()
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(error, file=sys.stderr)
    message = error_message(error)
    _write_torchrun_error_file(message)  # first: torchrun may kill this rank once another has exited
    if world == 1 or not _exchange(message, rank, world):
        print(f"error: {message}" if rank == 0 else f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
    return code


def _exchange(message: str, rank: int, world: int) -> bool:
    """Print `message` if this rank should (see the module docstring); False when it could not tell (no store, or
    the store went away before this rank knew), so the caller prints for this rank."""
    store = _launcher_store()
    if store is None:
        return False
    space = "bdgemma_error/{}/{}/".format(os.environ.get("TORCHELASTIC_RUN_ID", ""),
                                          os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    wait, decided = timedelta(seconds=PEER_WAIT_S), False
    try:
        store.set(f"{space}{rank}", message)
        if rank == 0:
            others = [f"{space}{r}" for r in range(1, world)]
            arrived = others if _wait(store, others, wait) else [k for k in others if store.check([k])]
            alike = len(arrived) == len(others) and all(store.get(k).decode() == message for k in arrived)
            print(f"error: {message}" if alike else f"error: rank 0: {message}", file=sys.stderr, flush=True)
            decided = True
            store.set(f"{space}printed", "1")
            _wait(store, [f"{k}/done" for k in arrived], wait)
            return True
        first = store.get(f"{space}0").decode() if _wait(store, [f"{space}0"], 2 * wait) else None
        decided = True
        if first != message:
            print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
            store.set(f"{space}{rank}/done", "1")
            return True
        # Rank 0 prints it: stay alive until it has (torchrun kills the job when this rank exits), then a moment
        # longer, so that rank 0 exits first and torchrun's summary gives it as the root cause.
        _wait(store, [f"{space}printed"], wait)
        store.set(f"{space}{rank}/done", "1")
        time.sleep(LINGER_S)
        return True
    except Exception:  # noqa: BLE001 - the store went away (its host exited)
        return decided


def _launcher_store() -> Any | None:
    """A client of the launcher's key-value store (MASTER_ADDR:MASTER_PORT), or None when there is none."""
    import torch.distributed as dist

    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (address and port and dist.is_available()):
        return None
    try:
        return dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=PEER_WAIT_S),
                             wait_for_workers=False)
    except Exception:  # noqa: BLE001 - nothing listens there (yet): no exchange
        return None


def _wait(store: Any, keys: list[str], timeout: timedelta) -> bool:
    """Whether all `keys` are in `store` within `timeout`. Polls `check`, which never blocks: the store's own `wait`
    would log a c10d socket warning on stderr when it times out, which is an expected outcome here."""
    deadline = time.monotonic() + timeout.total_seconds()
    while not store.check(keys):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _write_torchrun_error_file(message: str) -> None:
    """torchrun's failure summary shows the message of this rank's error file (its `traceback` field)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": f"error: {message}", "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as file:
            json.dump(record, file)
    except OSError:
        pass  # the summary then says what it says without one
