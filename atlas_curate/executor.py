"""Map a per-scan function over scans: in-process, a local process pool, or a Dask cluster.

The per-scan function must be a picklable top-level function of one item. It returns a value
(``ok``), raises :class:`Skip` (``skipped`` with the reason), :class:`Failed` (``failed`` with exactly
its reason) or anything else (``failed`` with the exception type and message). A failure never stops
the other items; the caller gets one :class:`Outcome` per item and decides the exit status.

:func:`run_stream` is the one executor: it yields the outcomes as the items finish, with at most
``in_flight`` items submitted at once (the items are drawn from their iterable only as room frees up),
so that memory stays bounded whatever the number of scans. :func:`run_map` collects them in input order.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Sized

import pandas as pd
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")

#: Peak memory of one worker of each stage, in GiB, measured on 1 mm heads of 256³ voxels (a normalize worker
#: holds the head, the template, antspyx's pyramids and the resampled outputs; see benchmarks/README.md).
#: ``default_jobs`` divides the available memory by these so that ``--jobs``'s default never swaps.
WORKER_MEMORY_GIB = {
    "synth": 1.25,      # with synth --pathology; 1.0 without
    "bids-convert": 0.8,
    "normalize": 2.0,
    "overlap-map": 0.5,
    "export": 0.5,
    "evaluate": 1.0,
}


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a batch scheduler's cpuset), further
    limited by a cgroup v2 CPU quota (containers), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def available_memory() -> int | None:
    """Bytes of memory available to new processes: ``MemAvailable``, or less under a cgroup v2 memory limit;
    ``None`` when neither can be read."""
    found = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def default_jobs(stage: str) -> int:
    """``--jobs`` when not given: every usable CPU (:func:`usable_cpus`), capped so that each worker of
    ``stage`` has its :data:`WORKER_MEMORY_GIB` of the available memory; at least 1."""
    jobs = usable_cpus()
    memory = available_memory()
    if memory is not None:
        jobs = min(jobs, int(memory // int(WORKER_MEMORY_GIB[stage] * 2**30)))
    return max(1, jobs)


class Skip(Exception):
    """Raised by a per-scan function when there is nothing to do (e.g. outputs already exist).

    ``value`` (optional) is carried to the outcome, e.g. the report row of the earlier run.
    """

    def __init__(self, reason: str, value: Any = None):
        super().__init__(reason)
        self.value = value


class Failed(Exception):
    """Raised by a per-scan function to fail its item with exactly this reason (no exception type prefixed),
    e.g. a reason already naming the file at fault."""


@dataclass
class Outcome:
    key: str
    status: str  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    value: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _run_one(func: Callable[[Any], Any], item: Any, key: str) -> Outcome:
    start = time.perf_counter()
    try:
        value = func(item)
    except Skip as skip:
        return Outcome(key, "skipped", str(skip), time.perf_counter() - start, skip.value)
    except Failed as failed:
        return Outcome(key, "failed", str(failed), time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported outcome
        log.debug("%s failed:\n%s", key, traceback.format_exc())
        reason = str(exc) if type(exc).__name__ in str(exc) else f"{type(exc).__name__}: {exc}"
        return Outcome(key, "failed", reason, time.perf_counter() - start)
    return Outcome(key, "ok", "", time.perf_counter() - start, value)


def run_map(func: Callable[[Any], Any], items: Iterable[Any], *, key: Callable[[Any], str] = str, jobs: int = 1,
            executor: str = "local", scheduler: str | None = None, desc: str = "scans", progress: bool = True,
            in_flight: int | None = None) -> list[Outcome]:
    """Apply ``func`` to every item and return outcomes in input order (:func:`run_stream`, collected)."""
    items = list(items)
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("run_map needs unique keys")
    results = {o.key: o for o in run_stream(func, items, key=key, jobs=jobs, executor=executor, scheduler=scheduler,
                                            desc=desc, progress=progress, in_flight=in_flight)}
    return [results[k] for k in keys]


def run_stream(func: Callable[[Any], Any], items: Iterable[Any], *, key: Callable[[Any], str] = str, jobs: int = 1,
               executor: str = "local", scheduler: str | None = None, desc: str = "scans", progress: bool = True,
               in_flight: int | None = None) -> Iterator[Outcome]:
    """Apply ``func`` to every item and yield each :class:`Outcome` as soon as its item finishes.

    At most ``in_flight`` items (default ``2 * jobs``; for Dask at least twice the cluster's worker threads)
    are submitted and not yet yielded at any time: ``items`` is drawn lazily, so a generator of items keeps
    memory bounded. ``executor='local'`` uses ``jobs`` worker processes (``jobs=1``, or a single item: in this
    process, in input order). ``executor='dask'`` submits to the Dask scheduler at ``scheduler`` (e.g.
    ``tcp://host:8786``, or a ``dask_jobqueue`` cluster's address); the workers need atlas-curate installed.
    Keys must be unique (a repeated key raises ``ValueError`` when it is reached).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {EXECUTORS}")
    if executor == "dask" and not scheduler:
        raise ValueError("--executor dask needs --scheduler ADDRESS (e.g. tcp://127.0.0.1:8786)")
    if in_flight is not None and in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    jobs = max(1, int(jobs))
    total = len(items) if isinstance(items, Sized) else None
    pending = _keyed(items, key)
    if executor == "dask":
        stream = _stream_dask(func, pending, scheduler, jobs, in_flight)
    elif jobs == 1 or (total is not None and total <= 1):
        stream = (_run_one(func, element, k) for element, k in pending)
    else:
        stream = _stream_pool(func, pending, jobs, in_flight or 2 * jobs)
    return _with_bar(stream, total=total, desc=desc, disable=not progress or total == 0)


def _with_bar(stream: Iterator[Outcome], **options) -> Iterator[Outcome]:
    bar = tqdm(unit="scan", leave=False, dynamic_ncols=True, **options)
    try:
        for outcome in stream:
            bar.update()
            yield outcome
    finally:
        bar.close()


def _keyed(items: Iterable[Any], key: Callable[[Any], str]) -> Iterator[tuple[Any, str]]:
    """``(item, key)`` of each item, drawn lazily; a repeated key is a ``ValueError``."""
    seen: set[str] = set()
    for element in items:
        k = key(element)
        if k in seen:
            raise ValueError(f"run_stream needs unique keys: {k!r} is repeated")
        seen.add(k)
        yield element, k


def _died(k: str) -> Outcome:
    return Outcome(k, "failed", "worker process died (out of memory or crash)")


def _stream_pool(func, pending: Iterator[tuple[Any, str]], jobs: int, window: int) -> Iterator[Outcome]:
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        running: dict = {}
        try:
            while True:
                while len(running) < window and (following := next(pending, None)) is not None:
                    element, k = following
                    try:
                        running[pool.submit(_run_one, func, element, k)] = k
                    except BrokenProcessPool:
                        yield _died(k)
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    k = running.pop(fut)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        yield _died(k)
        finally:
            for fut in running:
                fut.cancel()


def _stream_dask(func, pending: Iterator[tuple[Any, str]], scheduler: str, jobs: int,
                 in_flight: int | None) -> Iterator[Outcome]:
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the dask executor needs the 'dask' extra: pip install 'atlas-curate[dask]'") from exc
    with Client(scheduler) as client:
        window = in_flight or 2 * max(jobs, sum(client.nthreads().values()))
        running: dict = {}

        def submit(element, k):
            fut = client.submit(_run_one, func, element, k, key=f"atlas-curate-{k}-{time.time_ns()}", pure=False)
            running[fut] = k
            return fut

        finished = as_completed([submit(element, k) for element, k in itertools.islice(pending, window)])
        for fut in finished:
            k = running.pop(fut)
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker or similar
                outcome = Outcome(k, "failed", f"dask task error: {type(exc).__name__}: {exc}")
            fut.release()
            yield outcome
            for element, following in itertools.islice(pending, max(0, window - len(running))):
                finished.add(submit(element, following))


def outcomes_table(outcomes: Sequence[Outcome]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"scan": o.key, "status": o.status, "reason": o.reason, "seconds": round(o.seconds, 3)}
         for o in outcomes],
        columns=["scan", "status", "reason", "seconds"],
    )


def summarize(outcomes: Sequence[Outcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    lines = [f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed"]
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"  FAILED {o.key}: {o.reason}")
    return "\n".join(lines)
