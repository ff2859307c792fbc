#!/usr/bin/env python
"""normalize's registration of brain-extracted native T1s (``register_brain``) against the whole-head path
(``register``), on the same scans: time per scan, accuracy against the truth, and where each lands.

Synthetic scans: native heads rendered as the synthetic release renders them (``atlas_curate.synth``: a
deformed subject with lesions, a random pose, the cohorts' 1 mm and 0.9 x 0.9 x 3 mm grids, bias and noise),
and the same scan brain-extracted: everything outside the subject's brain, dilated by 0-2 mm, set to 0. Both
are registered (the lesion mask given, as normalize does). Accuracy: displacement between the recovered and
the true native->template affine over the template brain (mean, p95), target <= 0.5 / 1.0 mm; the two paths
on the same scan: distance between their affines over the template brain (mean), target <= 1 mm.

Real brain (``--brain``, e.g. Colin27's ``ch2bet.nii.gz``): scanned in ``--poses`` random poses by
``atlas_curate.synth.scanner.scan_head`` (rotation, shift, scale, grid, orientation, bias, noise), zeroed
outside the posed brain, registered with ``register_brain``; T_k = A_k Q_k^-1 (original -> template) must agree
between poses: pairwise distance over the template brain (mean), target <= 1 mm.

Usage:
    python benchmarks/bench_brain.py [--scans 4] [--seed 5] [--brain ch2bet.nii.gz --poses 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage


def brain_points_ras(stride: int = 10) -> np.ndarray:
    """Every ``stride``-th template brain voxel centre, world RAS mm."""
    from atlas_curate.templates import get_template

    tpl = nib.load(get_template().t1w)
    idx = np.argwhere(np.asarray(tpl.dataobj) > 0)[::stride]
    return idx @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]


def distances(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> np.ndarray:
    """|a^-1 p - b^-1 p| over template points p: where two X -> template affines put each point in X."""
    ia, ib = np.linalg.inv(a), np.linalg.inv(b)
    return np.linalg.norm((points @ ia[:3, :3].T + ia[:3, 3]) - (points @ ib[:3, :3].T + ib[:3, 3]), axis=1)


def strip(image: nib.Nifti1Image, brain: np.ndarray, dilate_mm: float) -> nib.Nifti1Image:
    """``image`` with everything farther than ``dilate_mm`` from ``brain`` (same grid) set to 0."""
    zooms = np.asarray(image.header.get_zooms()[:3], float)
    keep = brain if dilate_mm <= 0 else ndimage.distance_transform_edt(~brain, sampling=zooms) <= dilate_mm
    data = np.where(keep, np.asarray(image.dataobj, dtype=np.float32), 0.0).astype(np.float32)
    out = nib.Nifti1Image(data, image.affine)
    out.header.set_xyzt_units("mm", "sec")
    return out


@dataclasses.dataclass
class SynthScan:
    name: str
    head: nib.Nifti1Image              # whole head, native grid
    brain: nib.Nifti1Image             # the same, brain-extracted
    lesion: nib.Nifti1Image | None     # uint8 union of the lesions, native grid
    truth: np.ndarray                  # native world RAS -> template world RAS
    zooms: tuple
    dilate_mm: float
    lesion_ml: float


def synthetic_scan(seed: int, index: int, dilate_mm: float, *, cohort: int | None = None,
                   n_lesions: int | None = None) -> SynthScan:
    """Subject ``index`` of a synthetic native release (seed ``seed``) rendered as ``render_scan`` renders it,
    whole and brain-extracted (the subject's brain dilated by ``dilate_mm``). ``cohort`` (1-4) picks the grid
    (1, 2: 1 mm; 3, 4: 0.9 x 0.9 x 3 mm), ``n_lesions`` overrides the planned lesion count."""
    from atlas_curate.synth.head import head_model
    from atlas_curate.synth.release import COHORTS, _cohort
    from atlas_curate.synth.render import make_subject, native_grid, random_pose, render

    model = head_model()
    cohort_spec = _cohort(cohort or COHORTS[index % len(COHORTS)].number)
    n = n_lesions if n_lesions is not None else 1 + index % 3
    subject = make_subject(seed, index, n, False, model)
    rng = np.random.default_rng([seed, index, 1])
    pose = random_pose(rng)
    shape, affine = native_grid(cohort_spec, pose, model)
    rendered = render(subject, model, shape, affine, pose, rng, slice_thickness_mm=cohort_spec.zooms[2],
                      brain_mask=True)
    head = nib.Nifti1Image(np.clip(rendered.image, 0, None).astype(np.float32) * 1000.0, affine)
    head.header.set_xyzt_units("mm", "sec")
    lesion = None
    lesion_ml = 0.0
    if rendered.smooth_masks:
        union = np.any(rendered.smooth_masks, axis=0)
        lesion = nib.Nifti1Image(union.astype(np.uint8), affine)
        lesion_ml = float(union.sum() * abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    return SynthScan(f"s{seed}-{index}-c{cohort_spec.number}", head, strip(head, rendered.brain, dilate_mm), lesion,
                     pose, cohort_spec.zooms, dilate_mm, lesion_ml)


def _timed(fn, *args, **kwargs):
    work = tempfile.mkdtemp(prefix="atlas-curate-bench-brain-")
    try:
        start = time.perf_counter()
        reg = fn(*args, workdir=work, **kwargs)
        return reg, time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)


def synthetic_sweep(args, points: np.ndarray) -> list[dict]:
    from atlas_curate.normalize.register import register, register_brain

    rows = []
    for k in range(args.scans):
        # cohorts cycle through 1 mm and 0.9 x 0.9 x 3 mm grids, the dilation through 0, 1 and 2 mm
        scan = synthetic_scan(args.seed, k, float(k % 3), cohort=1 + k % 4)
        whole, whole_s = _timed(register, scan.head, scan.lesion)
        brain, brain_s = _timed(register_brain, scan.brain, scan.lesion)
        e_whole = distances(whole.affine_ras, scan.truth, points)
        e_brain = distances(brain.affine_ras, scan.truth, points)
        between = distances(whole.affine_ras, brain.affine_ras, points)
        row = {"scan": scan.name, "zooms": "x".join(f"{z:g}" for z in scan.zooms), "dilate_mm": scan.dilate_mm,
               "lesion_ml": round(scan.lesion_ml, 1),
               "whole_s": round(whole_s, 2), "brain_s": round(brain_s, 2),
               "whole_mean_mm": round(float(e_whole.mean()), 3),
               "whole_p95_mm": round(float(np.percentile(e_whole, 95)), 3),
               "brain_mean_mm": round(float(e_brain.mean()), 3),
               "brain_p95_mm": round(float(np.percentile(e_brain, 95)), 3),
               "brain_vs_whole_mm": round(float(between.mean()), 3),
               "brain_steps": brain.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def posed_brain(brain: nib.Nifti1Image, spec) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The real brain-extracted ``brain`` scanned as ``spec`` says, zeroed outside the posed brain (the scanner
    adds noise everywhere); returns the image and Q (scan world -> original world)."""
    from atlas_curate.synth.scanner import scan_head

    scan = scan_head(brain, spec, brain)
    support = scan_head(brain, dataclasses.replace(spec, noise=0.0, bias_range=(1.0, 1.0), lesion_mm3=0.0), brain)
    inside = np.asarray(support.image.dataobj) > 0.05 * float(np.percentile(np.asarray(brain.dataobj), 99))
    data = np.where(inside, np.asarray(scan.image.dataobj), 0.0).astype(np.float32)
    out = nib.Nifti1Image(data, scan.image.affine)
    out.header.set_xyzt_units("mm", "sec")
    return out, scan.q


def pose_sweep(args, points: np.ndarray) -> list[dict]:
    from atlas_curate.normalize.register import register_brain
    from atlas_curate.synth.scanner import random_spec

    brain = nib.load(args.brain)
    rng = np.random.default_rng(args.seed)
    recovered, rows = [], []
    for k in range(args.poses):
        spec = random_spec(rng, lesion_mm3=0.0, grid="1mm" if k % 2 == 0 else "0.9x0.9x3", neck_cut_mm=None)
        image, q = posed_brain(brain, spec)
        reg, seconds = _timed(register_brain, image)
        recovered.append(reg.affine_ras @ np.linalg.inv(q))
        rows.append({"pose": k, "grid": spec.grid, "orientation": spec.orientation,
                     "rotation_deg": round(float(np.abs(spec.rotation_deg).max()), 1), "seconds": round(seconds, 2)})
        print(json.dumps(rows[-1]), flush=True)
    pairs = [float(distances(recovered[j], recovered[k], points).mean())
             for j in range(len(recovered)) for k in range(j + 1, len(recovered))]
    return rows, pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=4, help="synthetic scans (default 4)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--brain", help="a real brain-extracted T1 (e.g. Colin27 ch2bet.nii.gz) for the pose sweep")
    parser.add_argument("--poses", type=int, default=4)
    args = parser.parse_args()

    from atlas_curate.normalize.register import warm_up

    points = brain_points_ras()
    warm_up()   # one-off per process (template images, the head-stage helper), as a normalize worker pays it
    if args.scans:
        rows = synthetic_sweep(args, points)

        def col(name):
            return np.array([r[name] for r in rows])

        print(f"\nsynthetic scans: {len(rows)}")
        for path in ("whole", "brain"):
            print(f"{path:5s}: {col(path + '_s').mean():6.1f} s/scan (max {col(path + '_s').max():.1f}), error mean "
                  f"{col(path + '_mean_mm').mean():.3f} mm (worst {col(path + '_mean_mm').max():.3f}), p95 "
                  f"{col(path + '_p95_mm').mean():.3f} mm (worst {col(path + '_p95_mm').max():.3f})")
        print(f"time whole/brain: {col('whole_s').sum() / col('brain_s').sum():.2f}x; brain-extracted vs whole head "
              f"on the same scan: mean {col('brain_vs_whole_mm').mean():.3f} mm (worst "
              f"{col('brain_vs_whole_mm').max():.3f}); targets: <= 0.5 mm mean, <= 1.0 mm p95, <= 1 mm apart")
    if args.brain and args.poses >= 2:
        rows, pairs = pose_sweep(args, points)
        print(f"\nreal brain, {len(rows)} poses: {np.mean([r['seconds'] for r in rows]):.1f} s/scan; pairwise "
              f"agreement (mean over the template brain): median {np.median(pairs):.3f} mm, worst {max(pairs):.3f} mm "
              "(target <= 1 mm)")
    print("reproduce:", " ".join([sys.executable, *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
