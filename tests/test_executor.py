"""Mapping a per-scan function over items: outcomes, order, failures, skips, pool and Dask."""

from __future__ import annotations

import time

import pytest

from atlas_curate.executor import Failed, Outcome, Skip, outcomes_table, run_map, run_stream, summarize

ITEMS = ["slow", "bad", "done", "fine"]


def work(item: str) -> str:
    """Top level so that it pickles into worker processes."""
    if item == "slow":
        time.sleep(0.3)  # finishes last under jobs=2: the result order must still be the input order
    if item == "bad":
        raise ValueError("cannot read bad")
    if item == "done":
        raise Skip("outputs exist for done", value="row of the earlier run")
    return item.upper()


def square(item: int) -> int:
    return item * item


def _check(outcomes: list[Outcome]) -> None:
    assert [o.key for o in outcomes] == ITEMS
    assert [o.status for o in outcomes] == ["ok", "failed", "skipped", "ok"]
    slow, bad, done, fine = outcomes
    assert slow.ok and slow.value == "SLOW" and slow.reason == ""
    assert fine.ok and fine.value == "FINE"
    assert not bad.ok and bad.value is None
    assert "ValueError" in bad.reason and "cannot read bad" in bad.reason
    assert done.reason == "outputs exist for done"
    assert done.value == "row of the earlier run", "a Skip's value is carried to the outcome"
    assert slow.seconds >= 0.25
    assert all(o.seconds >= 0 for o in outcomes)


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_map_statuses_and_order(jobs):
    _check(run_map(work, ITEMS, jobs=jobs, progress=False))


def test_run_map_custom_keys_and_empty():
    outcomes = run_map(square, [3, 1, 2], key=lambda i: f"item-{i}", progress=False)
    assert [(o.key, o.value) for o in outcomes] == [("item-3", 9), ("item-1", 1), ("item-2", 4)]
    assert run_map(square, [], progress=False) == []


def test_run_map_duplicate_keys_raise():
    with pytest.raises(ValueError, match="unique"):
        run_map(square, [1, 2, 3], key=lambda i: "same", progress=False)
    with pytest.raises(ValueError, match="unique"):
        run_map(square, ["a", "b", "a"], jobs=2, progress=False)


def test_run_map_unknown_executor_and_dask_without_scheduler():
    with pytest.raises(ValueError, match="executor"):
        run_map(square, [1], executor="slurm", progress=False)
    with pytest.raises(ValueError, match="scheduler"):
        run_map(square, [1], executor="dask", progress=False)


def test_outcomes_table_and_summary():
    outcomes = run_map(work, ITEMS, progress=False)
    table = outcomes_table(outcomes)
    assert list(table.columns) == ["scan", "status", "reason", "seconds"]
    assert table["scan"].tolist() == ITEMS
    assert table["status"].tolist() == ["ok", "failed", "skipped", "ok"]
    assert table.loc[table["scan"] == "done", "reason"].item() == "outputs exist for done"
    assert (table["seconds"] >= 0).all()
    assert list(outcomes_table([]).columns) == ["scan", "status", "reason", "seconds"]
    text = summarize(outcomes)
    assert text.splitlines()[0] == "2 ok, 1 skipped, 1 failed"
    assert "FAILED bad" in text and "cannot read bad" in text


def test_run_map_dask():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        outcomes = run_map(work, ITEMS, executor="dask", scheduler=cluster.scheduler_address, progress=False)
        # a second run on the same cluster must not collide with the first run's task keys
        again = run_map(square, [4, 5], executor="dask", scheduler=cluster.scheduler_address, progress=False)
    _check(outcomes)
    assert [o.value for o in again] == [16, 25]


class Drawn:
    """An iterable of items that counts how many have been drawn from it (in this process)."""

    def __init__(self, items):
        self.items, self.drawn = list(items), 0

    def __iter__(self):
        for item in self.items:
            self.drawn += 1
            yield item


def _bounded(outcomes, drawn: Drawn, in_flight: int) -> list[Outcome]:
    """Consume a stream, checking that at most ``in_flight`` items were drawn and not yet finished."""
    seen = []
    for outcome in outcomes:
        assert drawn.drawn - len(seen) <= in_flight, (drawn.drawn, len(seen))
        seen.append(outcome)
    return seen


def naps(item: float) -> float:
    time.sleep(item)
    return item


@pytest.mark.parametrize("jobs, in_flight", [(1, None), (2, None), (2, 3)])
def test_run_stream_is_bounded_and_yields_as_items_finish(jobs, in_flight):
    items = Drawn(ITEMS)
    outcomes = _bounded(run_stream(work, items, jobs=jobs, progress=False, in_flight=in_flight), items,
                        in_flight or 2 * jobs if jobs > 1 else 1)
    assert sorted(o.key for o in outcomes) == sorted(ITEMS) and items.drawn == len(ITEMS)
    _check(sorted(outcomes, key=lambda o: ITEMS.index(o.key)))   # failures and skips isolated, values kept
    if jobs == 1:
        assert [o.key for o in outcomes] == ITEMS, "in this process: input order"
    else:
        assert outcomes[-1].key == "slow", "the slow item is yielded when it finishes, after the others"
    # a longer generator through a window of two: never more than two drawn and not finished
    many = Drawn(0.02 * (i % 3) for i in range(12))
    keys = iter(range(12))
    streamed = _bounded(run_stream(naps, many, key=lambda _: f"item-{next(keys)}", jobs=jobs, in_flight=2,
                                   progress=False), many, 2 if jobs > 1 else 1)
    assert len(streamed) == 12 and all(o.ok for o in streamed)


def refuse(item: str) -> str:
    raise Failed(f"{item}.nii.gz: not on the template grid")


@pytest.mark.parametrize("jobs", [1, 2])
def test_failed_carries_exactly_its_reason(jobs):
    outcomes = run_map(refuse, ["a", "b"], jobs=jobs, progress=False)
    assert [(o.status, o.reason) for o in outcomes] == [("failed", "a.nii.gz: not on the template grid"),
                                                        ("failed", "b.nii.gz: not on the template grid")]


def test_run_stream_checks_options_when_called_and_keys_as_drawn():
    with pytest.raises(ValueError, match="executor"):
        run_stream(square, [1], executor="slurm")
    with pytest.raises(ValueError, match="scheduler"):
        run_stream(square, [1], executor="dask")
    with pytest.raises(ValueError, match="in_flight"):
        run_stream(square, [1], in_flight=0)
    stream = run_stream(square, [1, 2, 1], progress=False)
    assert [next(stream).value, next(stream).value] == [1, 4]
    with pytest.raises(ValueError, match="unique"):
        next(stream)
    assert list(run_stream(square, iter([]), jobs=2, progress=False)) == []


def test_run_stream_dask_is_bounded():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        items = Drawn(ITEMS)
        outcomes = _bounded(run_stream(work, items, executor="dask", scheduler=cluster.scheduler_address,
                                       in_flight=2, progress=False), items, 2)
        many = Drawn(range(10))
        squares = _bounded(run_stream(square, many, executor="dask", scheduler=cluster.scheduler_address,
                                      in_flight=3, progress=False), many, 3)
    _check(sorted(outcomes, key=lambda o: ITEMS.index(o.key)))
    assert sorted(o.value for o in squares) == [i * i for i in range(10)]


def test_default_jobs_follows_affinity_and_memory(monkeypatch):
    from atlas_curate import executor

    monkeypatch.setattr(executor.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(executor, "available_memory", lambda: 64 * 2**30)
    assert executor.usable_cpus() <= 8
    cpus = executor.usable_cpus()             # 8, or fewer under a cgroup CPU quota
    assert executor.default_jobs("normalize") == cpus
    # 5 GiB free: two normalize workers of 2 GiB, but ten overlap workers of 0.5 GiB capped by the CPUs
    monkeypatch.setattr(executor, "available_memory", lambda: 5 * 2**30)
    assert executor.default_jobs("normalize") == min(cpus, 2)
    assert executor.default_jobs("overlap-map") == min(cpus, 10)
    # almost no memory, or a single allowed CPU: still one worker
    monkeypatch.setattr(executor, "available_memory", lambda: 2**20)
    assert executor.default_jobs("normalize") == 1
    monkeypatch.setattr(executor.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(executor, "available_memory", lambda: None)
    assert executor.default_jobs("synth") == 1


def test_cli_jobs_default_and_explicit(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from atlas_curate import executor
    from atlas_curate.cli import main

    seen = {}

    def fake_synthesize(out, **kwargs):
        seen.update(kwargs)
        return {"scans": {}}

    monkeypatch.setattr("atlas_curate.synth.synthesize", fake_synthesize)
    monkeypatch.setattr(executor, "default_jobs", lambda stage: 7 if stage == "synth" else 1)
    assert CliRunner().invoke(main, ["synth", str(tmp_path / "a")]).exit_code == 0
    assert seen["jobs"] == 7
    assert CliRunner().invoke(main, ["synth", str(tmp_path / "b"), "--jobs", "1"]).exit_code == 0
    assert seen["jobs"] == 1
    assert "CPUs this process may use" in CliRunner().invoke(main, ["normalize", "--help"]).output
