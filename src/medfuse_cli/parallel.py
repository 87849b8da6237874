"""CPU threads: how many this process may use, the thread settings of the libraries, and work on
items in threads (numpy and scipy release the GIL in their loops), results in order."""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a Slurm job or ``taskset`` sets it),
    not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads(threads: int = 0) -> int:
    """``threads`` if positive; else ``OMP_NUM_THREADS`` when set (as torch reads it), else
    :func:`usable_cores`."""
    if threads > 0:
        return threads
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return usable_cores()


@contextlib.contextmanager
def itk_threads(threads: int) -> Iterator[None]:
    """ITK's default number of threads while the block runs (``threads`` > 0; 0: unchanged)."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if threads > 0:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def in_background(call: Callable[[], Any], name: str = "medfuse-helper") -> Callable[[], Any]:
    """Start ``call()`` in a daemon thread; returns a function that waits for it (in 0.1 s steps, so
    Ctrl-C and SIGTERM still act at once) and returns its result or raises its error. A helper whose
    result is never waited for is left to the process's exit."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc

    helper = threading.Thread(target=run, name=name, daemon=True)
    helper.start()

    def wait() -> Any:
        while helper.is_alive():
            helper.join(0.1)
        if "error" in box:
            raise box["error"]
        return box["result"]

    return wait


def interruptible(call: Callable[[], Any]) -> Any:
    """``call()`` run in a helper thread while this one waits: Ctrl-C and SIGTERM then stop the
    command at once. Python runs signal handlers between its own bytecodes only, so a long C call
    (an ITK registration) made here would hold them until it returned."""
    return in_background(call, "medfuse-itk")()


def _restore_variables(saved: dict[str, str | None]) -> None:
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@contextlib.contextmanager
def kept_thread_variables() -> Iterator[None]:
    """:data:`THREAD_VARIABLES` as they were before the block, whatever it sets (dask's LocalCluster
    sets them to 1 in the process that starts it)."""
    saved = {var: os.environ.get(var) for var in THREAD_VARIABLES}
    try:
        yield
    finally:
        _restore_variables(saved)


_LIMITS = threading.Lock()
_limits: dict[str, Any] = {"holders": 0}  # blocks of limited_threads now running, and what to restore


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """``threads`` (> 0) CPU threads for everything while the block runs: torch's intra-op threads
    (when torch is loaded), ITK's default, and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
    ``OPENBLAS_NUM_THREADS`` (which :func:`cpu_threads` and libraries loaded later read). These are
    the process's settings: blocks that overlap in threads (a dask worker with several threads runs
    cases at once) share them, and the last one to end restores them as they were before the first,
    so that a longer-lived process keeps its own."""
    import SimpleITK as sitk

    with _LIMITS:
        if not _limits["holders"]:
            torch = sys.modules.get("torch")
            _limits["restore"] = ({var: os.environ.get(var) for var in THREAD_VARIABLES},
                                  torch.get_num_threads() if torch is not None else None,
                                  sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        _limits["holders"] += 1
        os.environ.update({var: str(threads) for var in THREAD_VARIABLES})
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        with _LIMITS:
            _limits["holders"] -= 1
            if not _limits["holders"]:
                variables, torch_threads, itk = _limits.pop("restore")
                _restore_variables(variables)
                torch = sys.modules.get("torch")  # loaded in the block, it keeps its own default (all cores)
                if torch is not None and torch_threads is not None:
                    torch.set_num_threads(torch_threads)
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk)


def thread_map(work: Callable[[Any], Any], items: list[Any], workers: int,
               progress: Callable[[], None] | None = None, name: str = "medfuse") -> list[Any]:
    """``work`` on every item, ``workers`` at a time, results in the order of ``items``; ``progress``
    ticks once an item. The workers are daemon threads named ``name-k``: on Ctrl-C (raised in the
    waiting main thread) or a first error the call returns at once, without waiting for the items
    being worked on, so ``work`` must only read and compute (write the results afterwards)."""
    if workers <= 1 or len(items) < 2:
        done = []
        for item in items:
            done.append(work(item))
            if progress:
                progress()
        return done
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)
    finished: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((i, work(items[i]), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                finished.put((i, None, exc))

    for k in range(min(workers, len(items))):
        threading.Thread(target=worker, name=f"{name}-{k}", daemon=True).start()
    results: list[Any] = [None] * len(items)
    try:
        for _ in items:
            i, result, exc = finished.get()
            if exc is not None:
                raise exc
            results[i] = result
            if progress:
                progress()
    finally:
        stop.set()
    return results
