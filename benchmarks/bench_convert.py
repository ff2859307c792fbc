#!/usr/bin/env python
"""Benchmark ``bids-convert`` against the I/O floor of the same release, in the same run.

Measured on the same files, page cache warm for every measurement (nothing is dropped):

* copytree: ``shutil.copytree(release, tmp)``;
* floor:    copytree + decompressing every ``.nii.gz``/``.voi`` once (``gzip.decompress``; plain
            ``.nii`` read once) + reading the metadata table once; with ``--jobs J > 1`` the
            decompression is split over a pool of J processes. Run before and after the
            conversion; the minimum of the two is used;
* convert:  ``atlas_curate.convert.convert(release, out, jobs=J)`` into a fresh folder (wall time);
* rerun:    the same call on the same output (every scan skipped).

Target: convert / floor <= 2.0. Exit status 0 unless ``--check`` is given, then 1 when the ratio is
above the target or a scan was not converted.

The release is generated (untimed) with ``atlas_curate.synth.synthesize`` into ``--workdir`` and
reused there by later runs when kept (``--keep``), or given with ``--release``. Generation and
measurement each run in a fresh child process, so the reported peak RSS excludes the generation.
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TARGET_RATIO = 2.0
DEFAULT_SCANS = 100
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "atlas-curate-bench"
GZIP_SUFFIXES = (".nii.gz", ".voi")


# --- the release -------------------------------------------------------------------------------

def subjects_for(scans: int, seed: int) -> int:
    """The fewest subjects whose synthetic native release has at least ``scans`` scans."""
    from atlas_curate.synth import plan_release

    subjects = max(1, int(scans / 1.34))
    while len(plan_release(subjects, seed)) < scans:
        subjects += 1
    while subjects > 1 and len(plan_release(subjects - 1, seed)) >= scans:
        subjects -= 1
    return subjects


def release_paths(workdir: Path, subjects: int, seed: int) -> tuple[Path, Path, Path]:
    """(release, its truth folder, its completion marker) of the cached release for (subjects, seed)."""
    release = workdir / f"release-native-s{subjects}-seed{seed}"
    return release, workdir / f"{release.name}-truth", workdir / f"{release.name}.complete"


def prepare_release(workdir: str, scans: int | None, subjects: int | None, seed: int,
                    jobs: int) -> tuple[int, str, bool]:
    """The cached release in ``workdir``, generated if needed; returns (subjects, path, generated now).

    A release counts as complete only once its marker file exists.
    """
    from atlas_curate.synth import synthesize

    subjects = subjects or subjects_for(scans or DEFAULT_SCANS, seed)
    release, truth, marker = release_paths(Path(workdir), subjects, seed)
    if marker.is_file() and release.is_dir():
        print(f"reusing cached release {release}", flush=True)
        return subjects, str(release), False
    for path in (release, truth):  # left over from an interrupted generation
        if path.exists():
            shutil.rmtree(path)
    print(f"generating {subjects} subjects (seed {seed}) into {release} (not timed) ...", flush=True)
    start = time.perf_counter()
    synthesize(release, subjects=subjects, seed=seed, flavour="native", truth=truth, jobs=jobs, progress=True)
    marker.write_text(f"subjects={subjects} seed={seed}\n")
    print(f"generated in {time.perf_counter() - start:.1f} s", flush=True)
    return subjects, str(release), True


def remove_release(workdir: Path, subjects: int, seed: int) -> None:
    for path in release_paths(workdir, subjects, seed)[:2]:
        shutil.rmtree(path, ignore_errors=True)
    release_paths(workdir, subjects, seed)[2].unlink(missing_ok=True)


# --- the I/O floor -----------------------------------------------------------------------------

def _read_files(paths: list[str]) -> tuple[int, int]:
    """Decompress (or read) every file once; returns (decompressed bytes, unreadable files)."""
    total = bad = 0
    for name in paths:
        path = Path(name)
        try:
            data = gzip.decompress(path.read_bytes()) if name.endswith(GZIP_SUFFIXES) else path.read_bytes()
        except (EOFError, OSError, zlib.error):
            bad += 1
            continue
        total += len(data)
    return total, bad


def _split(paths: list[Path], parts: int) -> list[list[str]]:
    """Greedy split into ``parts`` lists of about equal total size (largest files first)."""
    buckets: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for path in sorted(paths, key=lambda p: -p.stat().st_size):
        i = loads.index(min(loads))
        buckets[i].append(str(path))
        loads[i] += path.stat().st_size
    return [b for b in buckets if b]


def _read_metadata(path: Path | None) -> int:
    import pandas as pd

    if path is None:
        return 0
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return len(pd.read_excel(path, dtype=object, engine="openpyxl"))
    return len(pd.read_csv(path, dtype=str, keep_default_na=False))


def floor(release: Path, image_files: list[Path], metadata: Path | None, copy_to: Path, jobs: int) -> dict:
    """One floor run: copytree, then every image decompressed once, then the metadata read once."""
    start = time.perf_counter()
    shutil.copytree(release, copy_to)
    copied = time.perf_counter()
    if jobs > 1 and len(image_files) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_read_files, _split(image_files, jobs)))
    else:
        results = [_read_files([str(p) for p in image_files])]
    rows = _read_metadata(metadata)
    end = time.perf_counter()
    shutil.rmtree(copy_to)  # not timed
    return {"copytree": copied - start, "floor": end - start,
            "decompressed": sum(r[0] for r in results), "unreadable": sum(r[1] for r in results),
            "metadata_rows": rows}


# --- the measurement (runs in a fresh child process) -------------------------------------------

def _counting_run_map(record: list):
    """Wrap the pipeline's ``run_map`` to record the per-scan statuses of each call (no timing effect)."""
    from atlas_curate.convert import pipeline

    original = pipeline.run_map

    def run_map(*args, **kwargs):
        outcomes = original(*args, **kwargs)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        record.append(counts)
        return outcomes

    pipeline.run_map = run_map


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"  # ru_maxrss is in KiB on Linux


def measure(release: str, scratch: str, jobs: int, command: str) -> bool:
    """Run and print every measurement; returns whether the target was met and every scan converted."""
    from atlas_curate.convert import convert, discover
    from atlas_curate.convert.discover import find_metadata

    load_at_start = os.getloadavg()[0]  # other work on the machine skews every figure
    release_path, scratch_path = Path(release), Path(scratch)
    flavour, scans = discover(release_path)
    metadata = find_metadata(release_path, flavour)
    files = [p for p in release_path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    image_files = [p for p in files if p.name.endswith(GZIP_SUFFIXES + (".nii",))]
    statuses: list[dict[str, int]] = []
    _counting_run_map(statuses)

    print(f"release {release_path}: {flavour}, {len(scans)} scans, {len(files)} files "
          f"({len(image_files)} images), {size / 1e6:.1f} MB; worker start method {mp.get_start_method()}",
          flush=True)
    print("floor run 1 ...", flush=True)
    floors = [floor(release_path, image_files, metadata, scratch_path / "floor-copy", jobs)]
    peak_before_convert = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = scratch_path / "bids"
    print("convert ...", flush=True)
    start = time.perf_counter()
    result = convert(release_path, out, jobs=jobs, progress=False)
    convert_s = time.perf_counter() - start
    print("rerun (all skipped) ...", flush=True)
    start = time.perf_counter()
    convert(release_path, out, jobs=jobs, progress=False)
    rerun_s = time.perf_counter() - start
    print("floor run 2 ...", flush=True)
    floors.append(floor(release_path, image_files, metadata, scratch_path / "floor-copy", jobs))

    copytree_s = min(f["copytree"] for f in floors)
    floor_s = min(f["floor"] for f in floors)
    ratio = convert_s / floor_s
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    first, second = statuses[0], statuses[1]
    all_converted = first.get("ok", 0) == len(scans) and result.n_failed == 0
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

    rows = [
        ("scans", f"{len(scans)}"),
        ("release size", f"{size / 1e6:.1f} MB ({floors[0]['decompressed'] / 1e6:.0f} MB decompressed)"),
        ("jobs", f"{jobs} (of {os.cpu_count()} CPUs, 1-min load average {load_at_start:.1f} at start)"),
        ("copytree", f"{copytree_s:.2f} s"),
        ("floor", f"{floor_s:.2f} s (runs: {', '.join('%.2f' % f['floor'] for f in floors)})"),
        ("convert", f"{convert_s:.2f} s ({_fmt_counts(first)})"),
        ("convert/floor", f"{ratio:.2f}"),
        ("target <= 2.0", verdict),
        ("rerun", f"{rerun_s:.2f} s ({_fmt_counts(second)})"),
        ("per-scan convert", f"{convert_s / max(len(scans), 1):.3f} s"),
        ("peak RSS, this process", f"{_mib(self_peak)} ({_mib(peak_before_convert)} before the conversion)"),
        ("peak RSS, largest worker", _mib(child_peak) if child_peak else "n/a (no worker processes)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print("bids-convert benchmark "
          f"(Python {platform.python_version()}, {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("  page cache warm for every measurement (nothing dropped); floor = the smaller of the runs "
          "before and after the conversion")
    print("  peak RSS: ru_maxrss of the measuring process (floor + convert, in-process when jobs=1 or one scan) "
          "and of its largest finished worker")
    if any(f["unreadable"] for f in floors):
        print(f"  note: {floors[0]['unreadable']} image(s) could not be decompressed by the floor")
    if not all_converted:
        print(f"  WARNING: not every scan was converted ({_fmt_counts(first)}, {result.n_failed} failed "
              "report rows); the timing is not comparable")
    if second.get("skipped", 0) != len(scans):
        print(f"  WARNING: the rerun did not skip every scan ({_fmt_counts(second)})")
    print(f"\nreproduce: {command}")
    sys.stdout.flush()
    return ratio <= TARGET_RATIO and all_converted


def _use_start_method(method: str) -> None:
    mp.set_start_method(method, force=True)


def in_fresh_process(func, *args):
    """``func(*args)`` in a new spawned interpreter (exceptions come back here).

    The measuring process must not inherit this one's memory high-water mark (ru_maxrss survives fork
    and exec), so neither the generation nor the measurement runs here. Inside, pools use this
    platform's default start method, as a plain ``atlas-curate bids-convert`` would (a spawned process
    would otherwise default to "spawn", each worker re-importing everything).
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                             initializer=_use_start_method, initargs=(mp.get_start_method(),)) as pool:
        return pool.submit(func, *args).result()


# --- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--scans", type=int, metavar="N",
                      help=f"at least N synthetic scans (default {DEFAULT_SCANS}); the subject count is "
                           "derived from the generator's plan (~1.33 scans per subject)")
    size.add_argument("--subjects", type=int, metavar="S", help="generate S subjects instead of --scans")
    size.add_argument("--release", type=Path, metavar="PATH",
                      help="benchmark this existing release (never written to) instead of generating one")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="J",
                        help="worker processes for the floor's decompression and the converter (default 1)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help=f"where the release is generated/cached and the scratch copies and BIDS output go "
                             f"(default {DEFAULT_WORKDIR})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated release in --workdir so that the next run reuses it")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when convert/floor > {TARGET_RATIO} or a scan was not converted")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    for name in ("scans", "subjects"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.release is not None and not args.release.is_dir():
        parser.error(f"--release {args.release}: not a folder")
    return args


def reproduce(args: argparse.Namespace, subjects: int | None, release: Path | None) -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_arg = str(script.relative_to(Path.cwd()))
    except ValueError:
        script_arg = str(script)
    cmd = [sys.executable, script_arg]
    if release is not None:
        cmd += ["--release", str(release)]
    else:
        cmd += ["--subjects", str(subjects), "--seed", str(args.seed)]
    cmd += ["--jobs", str(args.jobs)]
    if args.workdir is not None:
        cmd += ["--workdir", str(args.workdir.resolve())]
    if args.keep and release is None:
        cmd += ["--keep"]
    if args.check:
        cmd += ["--check"]
    return f"cd {shlex.quote(str(Path.cwd()))} && {shlex.join(cmd)}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = (args.workdir or DEFAULT_WORKDIR).resolve()
    created_workdir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    subjects, generated = None, False
    try:
        if args.release is not None:
            release = str(args.release.resolve())
        else:
            subjects, release, generated = in_fresh_process(prepare_release, str(workdir), args.scans,
                                                            args.subjects, args.seed, args.jobs)
        command = reproduce(args, subjects, args.release.resolve() if args.release else None)
        passed = in_fresh_process(measure, release, str(scratch), args.jobs, command)
        if args.release is None and args.keep:
            print(f"kept the release: rerun with --release {shlex.quote(release)} "
                  f"(or the same --subjects/--seed/--workdir)")
        return 1 if args.check and not passed else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if generated and not args.keep:
            remove_release(workdir, subjects, args.seed)
        if created_workdir and not args.keep and not any(workdir.iterdir()):
            workdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
