#!/usr/bin/env python
"""Benchmark the streaming overlap map against the plain approach (stack every mask, then mean), in one run.

Data (generated once, not timed): N lesion masks on the MNI152NLin2009aSym grid, 1-4 spherical blobs each
(radius log-uniform 3-25 mm, centres inside the template brain), written with their label images
(``desc-lesions_dseg``) as a fake ``normalize`` derivative of a BIDS dataset in ``--workdir``.

Measured on the same files, page cache warm, each in a fresh spawned process so that its wall time and
peak RSS are its own:

* plain:  what a user would write: ``np.stack([np.asanyarray(nib.load(p).dataobj) > 0 for p in masks])
          .mean(axis=0)``;
* map:    ``atlas_curate.overlap.accumulate`` with ``describe=False``: the streaming count map alone
          (one mask at a time, ``--jobs`` worker processes);
* stream: ``accumulate`` as ``overlap-map`` runs it: map + per-lesion stats (mask and dseg read, every
          lesion classified by ``atlas_curate.anatomy.classify_lesion``);
* full:   ``atlas_curate.overlap.overlap_map(root, jobs=J)``: selection, stream, tables, lesion report,
          figures (300 dpi PNGs; a fixed cost of a few seconds);
* the map again on a quarter of the scans: its peak memory must not grow with the number of scans.

Target (issue): the streaming map <= 0.05 s per scan for 200 scans on 2 cores (``--jobs 2``), with a peak
memory that does not grow with the number of scans. Exit status 0 unless ``--check`` is given, then 1 when
the streaming map is slower or the maps differ. The stream with per-lesion stats and the full stage are
reported beside it: their extra cost is mostly ``classify_lesion`` (about 30 ms of CPU per lesion, a
full-grid ``argwhere``), not reading.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

TARGET_S_PER_SCAN = 0.05
DEFAULT_SCANS = 200
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "atlas-curate-bench-overlap"
SPACE = "MNI152NLin2009aSym"


# --- the data ----------------------------------------------------------------------------------

def dataset_paths(workdir: Path, scans: int, seed: int) -> tuple[Path, Path]:
    root = workdir / f"overlap-n{scans}-seed{seed}"
    return root, workdir / f"{root.name}.complete"


def _blob_labels(shape, centres_ijk, radii) -> np.ndarray:
    """uint8 label image: lesion k = spheres[k-1]; on overlap the lower label wins (as bids-convert does)."""
    out = np.zeros(shape, np.uint8)
    for label, (c, radius) in enumerate(zip(centres_ijk, radii), start=1):
        r = int(np.ceil(radius))
        lo = np.maximum(c - r, 0)
        hi = np.minimum(c + r + 1, shape)
        i, j, k = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        ball = (i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2 <= radius ** 2
        box = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        box[ball & (box == 0)] = label
    return out


def prepare(workdir: str, scans: int, seed: int) -> str:
    """The fake derivative in ``workdir`` (reused when complete); returns the BIDS root."""
    import nibabel as nib

    from atlas_curate import io
    from atlas_curate.templates import get_template

    root, marker = dataset_paths(Path(workdir), scans, seed)
    if marker.is_file() and root.is_dir():
        print(f"reusing {root}", flush=True)
        return str(root)
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing {scans} synthetic template-grid masks into {root} (not timed) ...", flush=True)
    start = time.perf_counter()
    tpl = get_template()
    affine, shape = tpl.affine, tuple(tpl.shape)
    brain = np.argwhere(np.asarray(tpl.load().dataobj) > 0)
    rng = np.random.default_rng(seed)
    derivative = root / "derivatives" / "atlas-curate"
    derivative.mkdir(parents=True)
    t1 = derivative / "placeholder_T1w.nii.gz"  # scan discovery needs a template-space T1 per scan; not read
    io.save_nifti(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), affine), t1)
    participants = ["participant_id\tcohort"]
    for n in range(1, scans + 1):
        sub = f"b{n:04d}"
        base = derivative / f"sub-{sub}" / "ses-1" / "anat" / f"sub-{sub}_ses-1_space-{SPACE}"
        base.parent.mkdir(parents=True)
        count = int(rng.choice([1, 2, 3, 4], p=[0.55, 0.2, 0.15, 0.1]))
        centres = brain[rng.integers(len(brain), size=count)]
        radii = np.exp(rng.uniform(np.log(3.0), np.log(25.0), size=count))
        labels = _blob_labels(shape, centres, radii)
        for data, suffix in ((labels > 0, "label-L_desc-T1lesion_mask"), (labels, "desc-lesions_dseg")):
            img = nib.Nifti1Image(np.asarray(data, np.uint8), affine)
            img.set_sform(affine, code=4)
            io.save_nifti(img, Path(f"{base}_{suffix}.nii.gz"))
        os.link(t1, Path(f"{base}_desc-preproc_T1w.nii.gz"))
        participants.append(f"sub-{sub}\tsite{n % 4 + 1}")
    (root / "participants.tsv").write_text("\n".join(participants) + "\n")
    marker.write_text(f"scans={scans} seed={seed}\n")
    print(f"written in {time.perf_counter() - start:.1f} s", flush=True)
    return str(root)


# --- the measurements (each in a fresh process) ----------------------------------------------------

def _mask_paths(root: str) -> list[str]:
    pattern = "derivatives/atlas-curate/sub-*/ses-*/anat/*_desc-T1lesion_mask.nii.gz"
    return sorted(str(p) for p in Path(root).glob(pattern))


def _jobs(root: str, describe: bool, limit: int | None = None):
    from atlas_curate.overlap.maps import ScanJob

    masks = _mask_paths(root)[:limit]
    return [ScanJob(Path(m).name.split("_space-")[0], m,
                    m.replace("label-L_desc-T1lesion_mask", "desc-lesions_dseg"), describe=describe)
            for m in masks]


def _digest(prob: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(prob, dtype=np.float32).tobytes()).hexdigest()[:16]


def _cpu_s() -> float:
    """CPU seconds of this process and its finished workers (user + system): insensitive to other load."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def _peak_kib() -> tuple[int, int]:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def measure(kind: str, root: str, jobs: int, limit: int | None, scratch: str) -> dict:
    """One measurement in this (fresh) process: wall time, peak RSS before/after, map digest."""
    import nibabel as nib

    from atlas_curate.anatomy import template_anatomy
    from atlas_curate.overlap import accumulate, overlap_map
    from atlas_curate.overlap.maps import probability

    template_anatomy()  # the template arrays are a fixed cost, loaded before the baseline
    if kind == "full":
        from nilearn import plotting  # noqa: F401 - import cost is not part of the stage's per-scan work
    baseline = _peak_kib()[0]
    cpu = _cpu_s()
    start = time.perf_counter()
    if kind == "plain":
        masks = [np.asanyarray(nib.load(p).dataobj) > 0 for p in _mask_paths(root)[:limit]]
        prob = np.stack(masks).mean(axis=0)
        n = len(masks)
    elif kind in ("map", "stream"):
        scan_jobs = _jobs(root, describe=kind == "stream", limit=limit)
        count, outcomes = accumulate(scan_jobs, workers=jobs)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} scans failed, e.g. {failed[0].key}: {failed[0].reason}")
        n = len(scan_jobs)
        prob = probability(count, n)
    else:
        result = overlap_map(root, output=Path(scratch) / "overlap", jobs=jobs, progress=False)
        n = result.n_included
        prob = np.asanyarray(nib.load(result.files["prob"]).dataobj)
    seconds = time.perf_counter() - start
    cpu = _cpu_s() - cpu
    self_peak, child_peak = _peak_kib()
    return {"kind": kind, "n": n, "seconds": seconds, "cpu_s": cpu, "baseline_kib": baseline, "peak_kib": self_peak,
            "child_peak_kib": child_peak, "digest": _digest(prob)}


def _use_start_method(method: str) -> None:
    mp.set_start_method(method, force=True)


def in_fresh_process(func, *args):
    """``func(*args)`` in a new spawned interpreter whose pools use this platform's default start method."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                             initializer=_use_start_method, initargs=(mp.get_start_method(),)) as pool:
        return pool.submit(func, *args).result()


# --- report ------------------------------------------------------------------------------------

def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def _extra(r: dict) -> int:
    return r["peak_kib"] - r["baseline_kib"]


def _line(r: dict) -> str:
    extra = _extra(r)
    workers = f", largest worker {_mib(r['child_peak_kib'])}" if r["child_peak_kib"] else ""
    return (f"{r['seconds']:7.2f} s  {r['seconds'] / r['n']:.4f} s/scan (CPU {r['cpu_s'] / r['n']:.4f} s/scan)  "
            f"peak RSS {_mib(r['peak_kib'])} (+{_mib(extra)} over the process at start{workers})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=DEFAULT_SCANS, metavar="N",
                        help=f"number of synthetic masks (default {DEFAULT_SCANS})")
    parser.add_argument("--jobs", "-j", type=int, default=2, metavar="J",
                        help="worker processes for the streaming map (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where the masks are written (default {DEFAULT_WORKDIR})")
    parser.add_argument("--keep", action="store_true", help="keep the masks for the next run")
    parser.add_argument("--skip-full", action="store_true", help="do not time the whole overlap_map stage")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when the streaming map takes more than {TARGET_S_PER_SCAN} s per scan or the "
                             "maps differ")
    args = parser.parse_args(argv)
    if args.scans < 4 or args.jobs < 1:
        parser.error("--scans must be >= 4 and --jobs >= 1")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    load = os.getloadavg()[0]
    try:
        root = in_fresh_process(prepare, str(workdir), args.scans, args.seed)
        results = {}
        for kind in ("plain", "map", "stream") + (() if args.skip_full else ("full",)):
            print(f"{kind} ...", flush=True)
            results[kind] = in_fresh_process(measure, kind, root, args.jobs, None, str(scratch))
        quarter = max(1, args.scans // 4)
        print(f"map on {quarter} scans ...", flush=True)
        small = in_fresh_process(measure, "map", root, args.jobs, quarter, str(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep:
            root_dir, marker = dataset_paths(workdir, args.scans, args.seed)
            shutil.rmtree(root_dir, ignore_errors=True)
            marker.unlink(missing_ok=True)

    per_scan = results["map"]["seconds"] / results["map"]["n"]
    digests = {k: r["digest"] for k, r in results.items()}
    equal = len(set(digests.values())) == 1
    plain, ours = results["plain"], results["map"]
    rows = [
        ("scans", f"{plain['n']}"),
        ("jobs", f"{args.jobs} (of {os.cpu_count()} CPUs; 1-min load average {load:.1f} at start)"),
        ("plain: stack + mean", _line(plain)),
        ("map (streaming)", _line(ours)),
        ("map + lesion stats", _line(results["stream"])),
    ]
    if "full" in results:
        rows.append(("full overlap_map", _line(results["full"])))
    rows += [
        (f"map on {small['n']} scans", _line(small)),
        ("plain / streaming map", f"time {plain['seconds'] / ours['seconds']:.2f}x, memory over start "
                                  f"{_extra(plain) / max(_extra(ours), 1):.1f}x"),
        (f"target <= {TARGET_S_PER_SCAN} s/scan", f"{'PASS' if per_scan <= TARGET_S_PER_SCAN else 'FAIL'} "
                                                  f"({per_scan:.4f} s/scan, streaming map)"),
        ("maps equal (float32 sha256)", "yes" if equal else f"NO: {digests}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\noverlap-map benchmark (Python {platform.python_version()}, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("  page cache warm; each line ran in a fresh process; peak RSS = ru_maxrss of that process (its "
          "workers separately)")
    return 1 if args.check and (per_scan > TARGET_S_PER_SCAN or not equal) else 0


if __name__ == "__main__":
    sys.exit(main())
