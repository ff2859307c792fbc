#!/usr/bin/env python
"""normalize's registration on a real head scanned many ways: pose agreement, distance from an independent
brain-to-brain reference, QC verdicts, time per scan; and QC calibrated on deliberately wrong transforms.

The head is a real T1 with scalp, face and neck (default: Colin27, ``ch2.nii.gz``, with its brain-extracted
``ch2bet.nii.gz``), put through ``atlas_curate.synth.scanner.scan_head``: random poses (rotation <= 12 deg,
some scans tilted to 20 deg, translation <= 15 mm, per-axis scale 0.93-1.07), 1 mm and 0.9 x 0.9 x 3 mm grids
in any of the 48 orientation codes, the field of view cropped to the head plus 6-16 mm with the neck cut at
random heights or left long, large fields of view with shoulders, smooth bias fields from 0.95-1.05x to
0.55-1.6x, Rician noise, and painted chronic-stroke lesions. There are ``--heads`` heads, each with its
own lesion (none, 0.5, 20, 60, 150 and 300 cm3: most of a hemisphere), each scanned ``--per-head`` times
under other conditions. Each scan is registered with ``atlas_curate.normalize.register.register`` (its
lesion mask given, as normalize does).

Registering scan k gives A_k (scan world -> template world); Q_k maps scan world -> original head world, so
T_k = A_k Q_k^-1 (original -> template) must be the same matrix for every scan:

* agreement: for every pair (j, k) of scans of the same head, the distance between T_j^-1 p and T_k^-1 p
  over template brain points p (mean and p95); bounds 1 mm mean, 2 mm p95 (worst pair). Pairs of scans
  with different lesions are printed too, without a bound: a lesion changes the anatomy that is registered;
* reference: the same distance between T_k and R, the affine that a full-resolution antspyx
  ``registration(type_of_transform='Affine')`` finds between the brain-extracted head and the template
  (brain to brain: nothing to mislead it); bound 2 mm mean (identity would be ~2 mm away on Colin27);
* QC: every scan must pass ``templates/qc.json``;
* calibration: for the first ``--calibrate`` scans, the QC figures of the correct transform and of the same
  transform made wrong in template space (shifted 4, 8, 16 mm along x, y, z; rotated 10 deg about x, y, z;
  scaled 0.9 and 1.1) about the brain centre: every wrong one must fail QC. The margins are printed.

Usage:
    python benchmarks/bench_real_heads.py --head ch2.nii.gz --brain ch2bet.nii.gz [--heads 6] [--per-head 4]
        [--seed 0] [--calibrate 3] [--whole-process] [--json out.json] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

AGREE_MEAN, AGREE_P95, REFERENCE_MEAN = 1.0, 2.0, 2.0
WRONG = ([("shift", axis, mm) for mm in (4.0, 8.0, 16.0) for axis in range(3)]
         + [("rotate", axis, 10.0) for axis in range(3)] + [("scale", None, 0.9), ("scale", None, 1.1)])


HEADS = [0.0, 500.0, 20_000.0, 60_000.0, 150_000.0, 300_000.0]   # painted lesion per head (mm3): none to most
# of a hemisphere; every head is scanned ``--per-head`` times, each time under other conditions
CONDITIONS = [
    dict(grid="1mm", orientation="RAS"),
    dict(grid="0.9x0.9x3", orientation="LPS", thick_axis=2, bias_range=(0.6, 1.6)),
    dict(grid="1mm", orientation="ASL", shoulders=True, neck_cut_mm=None),            # shoulders in view
    dict(grid="0.9x0.9x3", orientation="PIR", thick_axis=0, neck_cut_mm=25.0),        # sagittal, neck cut high
    dict(grid="1mm", orientation="LAS", bias_range=(0.95, 1.05)),                     # weak bias
    dict(grid="1mm", orientation="RAS", max_rotation_deg=20.0),                       # tilted head
    dict(grid="0.9x0.9x3", orientation="ILA", thick_axis=1, bias_range=(0.55, 1.6)),  # coronal, strong bias
]


def sweep_specs(rng: np.random.Generator, heads: int, per_head: int):
    """(head, spec) pairs: ``heads`` heads (lesion volumes from ``HEADS``, each its own lesion, the same in
    every scan of that head), each scanned ``per_head`` times; the conditions cycle through ``CONDITIONS``
    (the rest of each spec, pose included, is random)."""
    from atlas_curate.synth.scanner import random_spec

    out = []
    for h in range(heads):
        lesion_seed = int(rng.integers(2 ** 31))
        for k in range(per_head):
            kw = dict(CONDITIONS[(h * per_head + k) % len(CONDITIONS)])
            rotation = kw.pop("max_rotation_deg", 12.0)
            spec = random_spec(rng, max_rotation_deg=rotation, lesion_mm3=HEADS[h % len(HEADS)], **kw)
            spec.lesion_seed = lesion_seed
            out.append((h, spec))
    return out


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def distances(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> np.ndarray:
    """|a^-1 p - b^-1 p| over template points p (a, b: original -> template)."""
    return np.linalg.norm(_apply(np.linalg.inv(a), points) - _apply(np.linalg.inv(b), points), axis=1)


def brain_points(stride: int = 20) -> np.ndarray:
    import nibabel as nib

    from atlas_curate.templates import get_template

    tpl = nib.load(get_template().t1w)
    idx = np.argwhere(np.asarray(tpl.dataobj) > 0)[::stride]
    return _apply(tpl.affine, idx.astype(float))


def reference_affine(brain_path: str, spacing: float = 1.0) -> np.ndarray:
    """Brain-to-brain affine (original head world RAS -> template world RAS) by plain antspyx."""
    import ants
    import nibabel as nib

    from atlas_curate.normalize.register import ants_affine_to_ras, template_images, to_ants

    fixed = template_images()["t1"]
    if spacing != 1.0:
        fixed = ants.resample_image(fixed, (spacing,) * 3, use_voxels=False, interp_type=0)
    moving = to_ants(nib.load(brain_path))
    out = ants.registration(fixed, moving, type_of_transform="Affine", aff_metric="mattes")
    return ants_affine_to_ras(out["fwdtransforms"][0])


def wrong_transform(affine_ras: np.ndarray, kind: str, axis, amount: float, centre: np.ndarray) -> np.ndarray:
    """``affine_ras`` followed by a template-space error about ``centre``."""
    from atlas_curate.synth.scanner import rotation

    error = np.eye(4)
    if kind == "shift":
        error[axis, 3] = amount
    else:
        if kind == "rotate":
            angles = np.zeros(3)
            angles[axis] = np.deg2rad(amount)
            linear = rotation(*angles)
        else:
            linear = np.eye(3) * amount
        error[:3, :3] = linear
        error[:3, 3] = centre - linear @ centre
    return error @ affine_ras


def run(args) -> dict:
    import nibabel as nib

    from atlas_curate.normalize import qc
    from atlas_curate.normalize.pipeline import qc_of_transform
    from atlas_curate.normalize.register import register, warm_up, write_ras_affine
    from atlas_curate.synth.scanner import scan_head

    head, brain = nib.load(args.head), nib.load(args.brain)
    points = brain_points()
    centre = points.mean(axis=0)
    t0 = time.perf_counter()
    reference = reference_affine(args.brain)
    reference_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_up()
    setup_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    rows, recovered, calibration = [], [], []
    heads = []
    for k, (head_k, spec) in enumerate(sweep_specs(rng, args.heads, args.per_head)):
        heads.append(head_k)
        scan = scan_head(head, spec, brain)
        lesion = scan.lesion if scan.lesion_mm3 > 0 else None
        work = tempfile.mkdtemp(prefix="atlas-curate-bench-real-")
        try:
            t0 = time.perf_counter()
            reg = register(scan.image, lesion, workdir=work)
            seconds = time.perf_counter() - t0
            t_k = reg.affine_ras @ np.linalg.inv(scan.q)
            recovered.append(t_k)
            d = distances(t_k, reference, points)
            values = qc_of_transform(reg.corrected, reg.transform_file, reg.affine_ras, lesion)
            passed, reasons = qc.verdict(values)
            row = {"scan": k, "head": head_k, "grid": spec.grid, "orientation": spec.orientation,
                   "rotation_deg": round(float(np.abs(spec.rotation_deg).max()), 1),
                   "neck_cut_mm": None if spec.neck_cut_mm is None else round(spec.neck_cut_mm),
                   "shoulders": spec.shoulders, "bias": [round(b, 2) for b in spec.bias_range],
                   "lesion_cm3": round(scan.lesion_mm3 / 1000, 1), "shape": list(scan.image.shape),
                   "reference_mean_mm": round(float(d.mean()), 3),
                   "reference_p95_mm": round(float(np.percentile(d, 95)), 3),
                   "qc_pass": passed, "qc_reasons": reasons,
                   **{key: round(float(values[key]), 4) for key in ("ncc_brain", "alignment_gain", "brain_coverage",
                                                                     "shear", "scale_min", "scale_max")},
                   "seconds": round(seconds, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if k < args.calibrate:
                for kind, axis, amount in WRONG:
                    wrong = wrong_transform(reg.affine_ras, kind, axis, amount, centre)
                    path = os.path.join(work, "wrong.mat")
                    write_ras_affine(wrong, path)
                    wrong_values = qc_of_transform(reg.corrected, path, wrong, lesion)
                    wrong_pass, why = qc.verdict(wrong_values)
                    calibration.append({"scan": k, "error": f"{kind} {'xyz'[axis] if axis is not None else ''} "
                                        f"{amount:g}".replace("  ", " "), "qc_pass": wrong_pass,
                                        "reasons": why, "ncc_brain": round(float(wrong_values["ncc_brain"]), 4),
                                        "alignment_gain": round(float(wrong_values["alignment_gain"]), 4)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    pairs = []
    for j in range(len(recovered)):
        for k in range(j + 1, len(recovered)):
            d = distances(recovered[j], recovered[k], points)
            pairs.append({"pair": [j, k], "same_head": heads[j] == heads[k], "mean_mm": float(d.mean()),
                          "p95_mm": float(np.percentile(d, 95))})
    return {"rows": rows, "pairs": pairs, "calibration": calibration, "reference_seconds": reference_seconds,
            "setup_seconds": setup_seconds, "reference": reference.tolist()}


def whole_process_seconds(head_path: str, brain_path: str, seed: int) -> float:
    """Wall time of ``atlas-curate normalize`` on a one-scan BIDS dataset, process start-up included."""
    import nibabel as nib

    from atlas_curate.synth.scanner import random_spec, scan_head

    root = Path(tempfile.mkdtemp(prefix="atlas-curate-bench-one-"))
    try:
        scan = scan_head(nib.load(head_path), random_spec(np.random.default_rng(seed), lesion_mm3=0.0),
                         nib.load(brain_path))
        anat = root / "sub-01" / "ses-1" / "anat"
        anat.mkdir(parents=True)
        nib.save(scan.image, anat / "sub-01_ses-1_T1w.nii.gz")
        (root / "dataset_description.json").write_text(json.dumps({"Name": "one scan", "BIDSVersion": "1.9.0"}))
        exe = Path(sys.executable).with_name("atlas-curate")
        t0 = time.perf_counter()
        subprocess.run([str(exe), "normalize", str(root), "--jobs", "1"], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict) -> bool:
    rows, pairs, calibration = result["rows"], result["pairs"], result["calibration"]
    ref = np.array([r["reference_mean_mm"] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    same = [p for p in pairs if p["same_head"]] or [{"mean_mm": 0.0, "p95_mm": 0.0}]
    other = [p for p in pairs if not p["same_head"]] or [{"mean_mm": 0.0, "p95_mm": 0.0}]
    agree_mean = np.array([p["mean_mm"] for p in same])
    agree_p95 = np.array([p["p95_mm"] for p in same])
    print(f"\n{len(rows)} scans; one-off setup {result['setup_seconds']:.1f} s; reference registration "
          f"{result['reference_seconds']:.1f} s")
    print(f"{'figure':<36}{'median':>9}{'p95':>9}{'worst':>9}{'bound':>9}")
    lines = [("same head: agreement, mean (mm)", agree_mean, AGREE_MEAN),
             ("same head: agreement, p95 (mm)", agree_p95, AGREE_P95),
             ("other lesion: agreement, mean (mm)", np.array([p["mean_mm"] for p in other]), None),
             ("from reference, mean (mm)", ref, REFERENCE_MEAN),
             ("seconds per scan", seconds, None)]
    ok = True
    for name, values, bound in lines:
        worst = float(values.max())
        ok &= bound is None or worst <= bound
        print(f"{name:<36}{np.median(values):>9.3f}{np.percentile(values, 95):>9.3f}{worst:>9.3f}"
              f"{'' if bound is None else f'{bound:>9.1f}'}")
    failed_qc = [r["scan"] for r in rows if not r["qc_pass"]]
    ok &= not failed_qc
    print(f"QC: {len(rows) - len(failed_qc)}/{len(rows)} correct registrations pass"
          + (f"; failed: {failed_qc}" if failed_qc else ""))
    if calibration:
        missed = [c for c in calibration if c["qc_pass"]]
        ok &= not missed
        good = min(r["ncc_brain"] for r in rows[:max(c["scan"] for c in calibration) + 1])
        print(f"QC calibration: {len(calibration) - len(missed)}/{len(calibration)} wrong transforms flagged; "
              f"lowest ncc_brain of a correct one {good:.3f}, highest of a wrong one "
              f"{max(c['ncc_brain'] for c in calibration):.3f}; alignment_gain: highest of a correct one "
              f"{max(r['alignment_gain'] for r in rows):.4f}, lowest of a wrong one "
              f"{min(c['alignment_gain'] for c in calibration):.4f}")
        by_error: dict[str, list[dict]] = {}
        for c in calibration:
            by_error.setdefault(c["error"], []).append(c)
        for name, values in by_error.items():
            print(f"  {name:<12} ncc_brain max {max(c['ncc_brain'] for c in values):.3f}, alignment_gain min "
                  f"{min(c['alignment_gain'] for c in values):.4f}")
        for c in missed:
            print(f"  NOT FLAGGED: scan {c['scan']} {c['error']} (ncc {c['ncc_brain']})")
    print("PASS" if ok else "FAIL")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", required=True, help="a real T1 head (e.g. Colin27 ch2.nii.gz)")
    parser.add_argument("--brain", required=True, help="the same head brain-extracted (e.g. ch2bet.nii.gz)")
    parser.add_argument("--heads", type=int, default=6, help="heads (lesions: none, 0.5, 20, 60, 150, 300 cm3)")
    parser.add_argument("--per-head", type=int, default=4, help="scans of each head, each under other conditions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", type=int, default=3, help="scans whose transforms are made wrong for QC")
    parser.add_argument("--whole-process", action="store_true",
                        help="also time `atlas-curate normalize` on one scan, process start-up included")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a bound is not met")
    args = parser.parse_args(argv)
    print(f"python {' '.join(sys.argv)}")
    result = run(args)
    if args.whole_process:
        result["whole_process_seconds"] = whole_process_seconds(args.head, args.brain, args.seed)
        print(f"whole process, one scan (atlas-curate normalize, start-up included): "
              f"{result['whole_process_seconds']:.1f} s")
    ok = report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
