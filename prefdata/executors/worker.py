"""Run one step's work in a child process that exits when the step ends.

A loaded model is only reliably given back (CUDA and vLLM memory above all) when the
process that loaded it exits, so the local executor runs every model-holding step here:
the step object is pickled into a fresh ``spawn`` process, which loads the model, computes
the shards and exits. Only the running step's models are ever in memory.

What a user keeps from an in-process run: the worker's progress bar and log lines go to
the same terminal (same log level and format); an exception in the worker is raised in
the parent as a ``WorkerError`` that names the step and carries the worker's traceback;
a worker killed by a signal (the kernel's OOM killer, SIGKILL) is reported with the
signal, and the shards it finished stay on disk for the next run to reuse. The worker
dies with its parent (``PR_SET_PDEATHSIG`` on Linux, and a thread that watches the
parent's pid everywhere), and it gets the parent's torch thread count.

As with every ``spawn`` process (PyTorch's DataLoader workers too), the worker imports the
main script again: a script that runs a pipeline does so under ``if __name__ ==
"__main__":``.

``PREFDATA_IN_PROCESS=1`` (or the local executor's ``in_process: true``, or
``prefdata run --in-process``) runs everything in the calling process instead: for
tests, debuggers and profilers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

IN_PROCESS_ENV = "PREFDATA_IN_PROCESS"
PROGRESS_ENV = {  # environment switches of the libraries' own progress bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "PREFDATA_NO_PROGRESS": "1",  # prefdata's own backends (prefdata.models.progress_disabled)
}


class WorkerError(RuntimeError):
    """A step failed (or was killed) in its worker process.

    ``str()`` is the whole story (message and the worker's traceback); ``summary`` is the
    message alone, for a terminal that shows tracebacks only with ``-v``.
    """

    def __init__(self, summary: str, worker_traceback: str = ""):
        text = summary if not worker_traceback else f"{summary}\n\ntraceback in the worker:\n{worker_traceback}"
        super().__init__(text)
        self.summary = summary
        self.worker_traceback = worker_traceback


def in_process_default() -> bool:
    """True when ``PREFDATA_IN_PROCESS`` asks for no worker processes."""
    return os.environ.get(IN_PROCESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def silence_progress_bars() -> None:
    """Turn off the progress bars of transformers, datasets and huggingface_hub too.

    Environment variables reach libraries imported later and every worker process; the
    libraries already imported are told directly.
    """
    os.environ.update(PROGRESS_ENV)
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except (ImportError, AttributeError):
            pass
    if "datasets" in sys.modules:
        try:
            import datasets

            datasets.disable_progress_bars()
        except (ImportError, AttributeError):
            pass
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except (ImportError, AttributeError):
            pass


@dataclass
class WorkerSettings:
    """What the child copies from the parent before it runs anything."""

    log_level: int = logging.WARNING
    log_format: str | None = None
    torch_threads: int | None = None
    progress: bool = True
    env: dict[str, str] = field(default_factory=dict)
    logger_levels: dict[str, int] = field(default_factory=dict)  # e.g. httpx kept at WARNING

    @classmethod
    def from_parent(cls, progress: bool = True) -> "WorkerSettings":
        root = logging.getLogger()
        fmt = None
        for handler in root.handlers:
            if handler.formatter is not None and handler.formatter._fmt:
                fmt = handler.formatter._fmt
                break
        threads = None
        if "torch" in sys.modules:
            threads = sys.modules["torch"].get_num_threads()
        levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
                  if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET}
        return cls(log_level=root.level if root.handlers else logging.WARNING, log_format=fmt,
                   torch_threads=threads, progress=progress, logger_levels=levels)

    def apply(self) -> None:
        os.environ.update(self.env)
        logging.basicConfig(level=self.log_level, format=self.log_format or logging.BASIC_FORMAT)
        for name, level in self.logger_levels.items():
            logging.getLogger(name).setLevel(level)
        if not self.progress:
            silence_progress_bars()
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)


def run_in_worker(name: str, fn: Callable, args: tuple = (), progress: bool = True,
                  poll: float = 0.2) -> Any:
    """Call ``fn(*args)`` in a fresh process and return its (picklable) result.

    ``name`` is the step's name, used in every error. The call blocks until the worker
    exits; the worker's memory goes back to the system when it returns.
    """
    try:
        blob = pickle.dumps((fn, args))
    except Exception as exc:
        raise ValueError(
            f"step '{name}' cannot be sent to a worker process (it does not pickle: {exc}); keep loaded "
            f"models and open files out of the step until setup(), or run with {IN_PROCESS_ENV}=1"
        ) from None
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    settings = WorkerSettings.from_parent(progress)
    process = ctx.Process(target=_worker_main, args=(sender, os.getpid(), blob, settings),
                          name=f"prefdata-{name}", daemon=True)
    started = time.perf_counter()
    process.start()
    sender.close()
    log.debug("step %s: worker pid %d started", name, process.pid)
    try:
        message = _wait(process, receiver, poll)
    except BaseException:
        _stop(process)
        raise
    finally:
        receiver.close()
    process.join()
    log.debug("step %s: worker pid %d exited with %s after %.1f s", name, process.pid, process.exitcode,
              time.perf_counter() - started)
    return _result(name, process, message)


def _wait(process, receiver, poll: float):
    """The worker's one message, or None when it exited without sending one."""
    while True:
        if receiver.poll(poll):
            try:
                return receiver.recv()
            except EOFError:
                return None
        if not process.is_alive():
            if receiver.poll(0):
                try:
                    return receiver.recv()
                except EOFError:
                    return None
            return None


def _stop(process) -> None:
    """End a worker the parent no longer waits for (Ctrl-C, an error in the parent)."""
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


def _result(name: str, process, message) -> Any:
    if message is not None and message[0] == "ok":
        return message[1]
    if message is not None and message[0] == "error":
        _, kind, text, trace = message
        raise WorkerError(f"step '{name}' failed in its worker process (pid {process.pid}): {kind}: {text}",
                          trace.rstrip())
    code = process.exitcode
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        hint = " (SIGKILL is what the kernel's out-of-memory killer sends)" if sig == "SIGKILL" else ""
        raise WorkerError(
            f"step '{name}': its worker process (pid {process.pid}) was killed by {sig}{hint}; the shards it "
            "finished are kept, run again to resume"
        )
    raise WorkerError(
        f"step '{name}': its worker process (pid {process.pid}) exited with code {code} without a result "
        "(see its messages above); the shards it finished are kept, run again to resume. A worker process "
        "imports the main script again: a script that runs a pipeline must do so under "
        "'if __name__ == \"__main__\":' (or set PREFDATA_IN_PROCESS=1)")


# -- in the child ---------------------------------------------------------------------------
def _worker_main(sender, parent_pid: int, blob: bytes, settings: WorkerSettings) -> None:
    _die_with_parent(parent_pid)
    try:
        settings.apply()
        fn, args = pickle.loads(blob)
        result = fn(*args)
        message = ("ok", result)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        import traceback

        message = ("error", type(exc).__name__, str(exc), traceback.format_exc())
    try:
        sender.send(message)
    except Exception as exc:  # an unpicklable result or exception text
        sender.send(("error", type(exc).__name__, f"could not send the worker's result: {exc}", ""))
    finally:
        sender.close()


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the parent: the kernel's parent-death signal, and a watching thread."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="prefdata-parent-watch", daemon=True).start()
