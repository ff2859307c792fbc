#!/usr/bin/env python
"""Benchmark normalize's registration against the naive antspyx pipeline, on the same scans, in one run.

For each synthetic native scan (truth known):

* ours:  ``atlas_curate.normalize.register.register`` (N4 on 4 mm inside a head mask, head stage,
         brain rounds at 4 mm with lesion masking, the least-squares refinement through a 4 mm SyN);
* naive: what a user would write: ``ants.n4_bias_field_correction(t1)`` (defaults, unmasked) then
         ``ants.registration(template_1mm, t1, type_of_transform='Affine')``.

Accuracy: displacement between the recovered and the true affine over template brain voxels (mean, p95).
Each method runs in a fresh child process so its wall time and peak RSS are its own (ours: plus the peak of its
head-stage helper process); the one-off setup of a
process (building the template images for ours, reading the template for naive) is timed apart, as a normalize
worker pays it once for all its scans.
Targets (issue): ours <= 20 s per scan and <= 2.5 GB; mean error <= 0.5 mm, p95 <= 1.0 mm; naive/ours >= 7.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _errors(affine: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    import nibabel as nib

    from atlas_curate.templates import get_template

    tpl = nib.load(get_template().t1w)
    idx = np.argwhere(np.asarray(tpl.dataobj) > 0)[::10]
    pts = idx @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    inv = np.linalg.inv(affine)
    back = (pts @ inv[:3, :3].T + inv[:3, 3]) @ truth[:3, :3].T + truth[:3, 3]
    err = np.linalg.norm(back - pts, axis=1)
    return float(err.mean()), float(np.percentile(err, 95))


def _lesion_dice(transform: str, lesion_paths: list[str], truth_dseg: str, min_mm3: float = 1000.0,
                 interpolator: str = "nearestNeighbor") -> list[float]:
    """Dice in template space between each true lesion of >= ``min_mm3`` and the release's mask of it warped
    nearest-neighbour with ``transform`` (the warped mask that overlaps the true lesion most)."""
    import ants
    import nibabel as nib

    from atlas_curate.io import load_nifti
    from atlas_curate.normalize.register import template_images, to_ants

    fixed = template_images()["t1"]
    warped = [ants.apply_transforms(fixed, to_ants(load_nifti(p)), [transform],
                                    interpolator=interpolator).numpy() > 0.5 for p in lesion_paths]
    truth = np.asarray(nib.load(truth_dseg).dataobj)
    scores = []
    for label in range(1, int(truth.max()) + 1):
        true = truth == label
        if true.sum() < min_mm3:  # 1 mm template voxels
            continue
        best = max(warped, key=lambda w: np.count_nonzero(w & true))
        scores.append(2 * np.count_nonzero(best & true) / (best.sum() + true.sum()))
    return scores


def _all_dice(transform: str, lesion_paths: dict[str, list[str]], truth_dseg: str,
              interpolator: str = "nearestNeighbor") -> dict[str, list[float]]:
    """Lesion Dice of the smoothed (``LesionSmooth``, what ATLAS ships as its mask) and the raw tracings."""
    return {kind: _lesion_dice(transform, paths, truth_dseg, interpolator=interpolator)
            for kind, paths in lesion_paths.items() if paths}


def _truth_transform(truth_ras: np.ndarray, path: str) -> str:
    """The true native->template RAS affine as an ANTs transform file (the ceiling of lesion Dice)."""
    from atlas_curate.normalize.register import write_ants_affine

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    write_ants_affine(flip @ np.linalg.inv(truth_ras) @ flip, path)
    return path


def _run(method: str, t1_path: str, lesion_path: str, queue, lesion_paths=None, truth_dseg=None) -> None:
    import ants

    from atlas_curate.io import load_nifti
    from atlas_curate.normalize.register import ants_affine_to_ras, register, to_ants, warm_up
    from atlas_curate.templates import get_template

    t1 = load_nifti(t1_path)
    # one-off per process (a normalize worker pays it once, not per scan): template images and a ready
    # head-stage helper for ours, the template read for naive
    setup = time.perf_counter()
    if method == "ours":
        warm_up("mni2009")
    else:
        naive_fixed = ants.image_read(str(get_template().t1w)).clone("float")
    setup = time.perf_counter() - setup
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if method == "ours":
            lesion = load_nifti(lesion_path) if lesion_path else None
            reg = register(t1, lesion, workdir=tmp)
            affine = reg.affine_ras
            transform = reg.transform_file
            stages = reg.seconds
        else:
            ants.config._random_seed = 1
            moving = ants.n4_bias_field_correction(to_ants(t1))
            reg = ants.registration(naive_fixed, moving, type_of_transform="Affine", outprefix=tmp + "/naive_")
            affine = ants_affine_to_ras(reg["fwdtransforms"][0])
            stages = {}
            transform = reg["fwdtransforms"][0]
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the evaluation below
        if method == "ours":  # plus the head-stage helper's peak (an upper bound of the two together)
            peak_mb += sum(_helper_peak_mb(pid) for pid in _helper_pids())
        dice = _all_dice(transform, lesion_paths, truth_dseg) if truth_dseg else {}
    queue.put({"seconds": seconds, "setup_s": setup, "peak_mb": peak_mb, "affine": affine.tolist(), "dice": dice,
               "stages": stages})


def _helper_pids() -> list[int]:
    from atlas_curate.normalize import register

    return [helper.proc.pid for helper in register._IDLE]


def _helper_peak_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a live process, in MB (0 where /proc is not available)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(method: str, t1: str, lesion: str, lesion_paths=None, truth_dseg=None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(method, t1, lesion, queue, lesion_paths or {}, truth_dseg))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=3, help="synthetic subjects (default 3)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--release", type=Path, help="existing synthetic native release (its truth beside it)")
    parser.add_argument("--skip-naive", action="store_true", help="only time our registration")
    parser.add_argument("--max-scans", type=int, default=None, help="only the first N scans of the release")
    args = parser.parse_args()

    from atlas_curate.ids import ScanId
    from atlas_curate.io import load_nifti  # noqa: F401 - import check before forking
    from atlas_curate.naming import native_mask, native_t1
    from atlas_curate.synth import default_truth_dir, synthesize

    work = Path(tempfile.mkdtemp(prefix="atlas-bench-norm-"))
    release = args.release
    if release is None:
        release = work / "release"
        synthesize(release, subjects=args.subjects, seed=args.seed, jobs=2, progress=False)
    truth = json.loads((default_truth_dir(release) / "truth.json").read_text())
    rows = []
    all_dice: dict[str, list[float]] = {}
    for key, scan in sorted(truth["scans"].items()):
        if scan.get("fault"):
            continue
        if args.max_scans is not None and len(rows) >= args.max_scans:
            break
        sid = ScanId.parse(key)
        t1 = str(release / native_t1(sid))
        lesion = str(release / native_mask(sid, "Smooth", 0, "nii.gz"))
        true = np.array(scan["native_to_template_ras"])
        folder = (release / native_t1(sid)).parent
        # raw tracings ship as MRIcron .voi only (gzipped NIfTI; load_nifti reads them)
        lesion_paths = {"Smooth": [str(p) for p in sorted(folder.glob(f"{key}_LesionSmooth*.nii.gz"))],
                        "Raw": [str(p) for p in sorted(folder.glob(f"{key}_LesionRaw*.voi"))]}
        truth_dseg = default_truth_dir(release) / "masks" / f"{key}_space-MNI152NLin2009aSym_desc-lesions_dseg.nii.gz"
        row = {"scan": key, "zooms": "x".join(f"{z:g}" for z in scan["zooms"])}
        if truth_dseg.is_file():
            true_mat = _truth_transform(true, str(work / "truth.mat"))
            ceiling = _all_dice(true_mat, lesion_paths, str(truth_dseg))
            # for comparison only (normalize resamples labels nearest-neighbour, as specified): ANTs' GenericLabel
            for kind, scores in _all_dice(true_mat, lesion_paths, str(truth_dseg), "genericLabel").items():
                all_dice.setdefault(("truth+GL", kind), []).extend(scores)
            for kind, scores in ceiling.items():
                all_dice.setdefault(("truth", kind), []).extend(scores)
        for method in ("ours",) + (() if args.skip_naive else ("naive",)):
            res = measure(method, t1, lesion, lesion_paths, str(truth_dseg) if truth_dseg.is_file() else None)
            mean, p95 = _errors(np.array(res["affine"]), true)
            row.update({f"{method}_s": res["seconds"], f"{method}_setup_s": res["setup_s"],
                        f"{method}_mb": res["peak_mb"],
                        f"{method}_mean_mm": mean, f"{method}_p95_mm": p95,
                        f"{method}_min_dice": min(res["dice"].get("Smooth", []), default=float("nan"))})
            if res["stages"]:
                row["ours_stages"] = res["stages"]
            for kind, scores in res["dice"].items():
                all_dice.setdefault((method, kind), []).extend(scores)
        rows.append(row)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    def col(name):
        return np.array([r[name] for r in rows if name in r])

    print("\nscans:", len(rows))
    print(f"ours : {col('ours_s').mean():6.1f} s/scan (max {col('ours_s').max():.1f}; one-off setup "
          f"{col('ours_setup_s').mean():.1f} s per process), peak {col('ours_mb').max():.0f} MB, "
          f"error mean {col('ours_mean_mm').mean():.2f} mm (worst {col('ours_mean_mm').max():.2f}), "
          f"p95 {col('ours_p95_mm').mean():.2f} mm (worst {col('ours_p95_mm').max():.2f})")
    stages = [r["ours_stages"] for r in rows if "ours_stages" in r]
    if stages:
        print("ours, mean seconds per step (head_stage runs in its helper beside bias_field):",
              ", ".join(f"{k} {np.mean([s[k] for s in stages if s.get(k) is not None]):.2f}" for k in stages[0]))
    for (method, kind), scores in sorted(all_dice.items()):
        scores = np.array(scores)
        print(f"lesion Dice, {method:8s} transform, {kind:6s} masks "
              f"(template space, lesions >= 1 cm3, n={len(scores)}): "
              f"mean {scores.mean():.3f}, min {scores.min():.3f}, {np.mean(scores >= 0.95):.0%} >= 0.95")
    if not args.skip_naive:
        print(f"naive: {col('naive_s').mean():6.1f} s/scan, peak {col('naive_mb').max():.0f} MB, "
              f"error mean {col('naive_mean_mm').mean():.2f} mm, p95 {col('naive_p95_mm').mean():.2f} mm")
        print(f"speed-up naive/ours: {col('naive_s').sum() / col('ours_s').sum():.1f}x (target >= 7x)")
    print("targets: <= 20 s and <= 2500 MB per scan; mean <= 0.5 mm, p95 <= 1.0 mm; lesion Dice >= 0.95")
    print("reproduce:", " ".join([sys.executable, *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
