"""Map a per-scan function over scans: in-process, a local process pool, or a Dask cluster.

The per-scan function must be a picklable top-level function of one item. It returns a value
(``ok``), raises :class:`Skip` (``skipped`` with the reason) or raises anything else (``failed``
with the reason). A failure never stops the other items; the caller gets one :class:`Outcome`
per item, in input order, and decides the exit status.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")

#: Peak memory of one worker of each stage, in GiB, measured on 1 mm heads of 256³ voxels (a normalize worker
#: holds the head, the template, antspyx's pyramids and the resampled outputs; see benchmarks/README.md).
#: ``default_jobs`` divides the available memory by these so that ``--jobs``'s default never swaps.
WORKER_MEMORY_GIB = {
    "synth": 1.0,
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
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported outcome
        log.debug("%s failed:\n%s", key, traceback.format_exc())
        reason = str(exc) if type(exc).__name__ in str(exc) else f"{type(exc).__name__}: {exc}"
        return Outcome(key, "failed", reason, time.perf_counter() - start)
    return Outcome(key, "ok", "", time.perf_counter() - start, value)


def run_map(
    func: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    key: Callable[[Any], str] = str,
    jobs: int = 1,
    executor: str = "local",
    scheduler: str | None = None,
    desc: str = "scans",
    progress: bool = True,
) -> list[Outcome]:
    """Apply ``func`` to every item and return outcomes in input order.

    ``executor='local'`` uses ``jobs`` worker processes (``jobs=1``: in this process).
    ``executor='dask'`` submits to the Dask scheduler at ``scheduler`` (e.g. ``tcp://host:8786``,
    or a ``dask_jobqueue`` cluster's address); the workers need atlas-curate installed.
    """
    items = list(items)
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("run_map needs unique keys")
    bar = tqdm(total=len(items), desc=desc, unit="scan", disable=not progress or not items,
               leave=False, dynamic_ncols=True)
    try:
        if executor == "dask":
            results = _run_dask(func, items, keys, scheduler, bar)
        elif executor == "local":
            if jobs <= 1 or len(items) <= 1:
                results = {}
                for item, k in zip(items, keys):
                    results[k] = _run_one(func, item, k)
                    bar.update()
            else:
                results = _run_pool(func, items, keys, jobs, bar)
        else:
            raise ValueError(f"unknown executor {executor!r}; choose one of {EXECUTORS}")
    finally:
        bar.close()
    return [results[k] for k in keys]


def _run_pool(func, items, keys, jobs, bar) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending = {pool.submit(_run_one, func, item, k): k for item, k in zip(items, keys)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                k = pending.pop(fut)
                try:
                    results[k] = fut.result()
                except BrokenProcessPool:
                    results[k] = Outcome(k, "failed", "worker process died (out of memory or crash)")
                bar.update()
    return results


def _run_dask(func, items, keys, scheduler, bar) -> dict[str, Outcome]:
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the dask executor needs the 'dask' extra: pip install 'atlas-curate[dask]'") from exc
    if not scheduler:
        raise ValueError("--executor dask needs --scheduler ADDRESS (e.g. tcp://127.0.0.1:8786)")
    results: dict[str, Outcome] = {}
    with Client(scheduler) as client:
        futures = [client.submit(_run_one, func, item, k, key=f"atlas-curate-{k}-{time.time_ns()}", pure=False)
                   for item, k in zip(items, keys)]
        by_future = dict(zip(futures, keys))
        for fut in as_completed(futures):
            k = by_future[fut]
            try:
                results[k] = fut.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker or similar
                results[k] = Outcome(k, "failed", f"dask task error: {type(exc).__name__}: {exc}")
            bar.update()
    return results


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
