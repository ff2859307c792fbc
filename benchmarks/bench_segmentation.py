"""Segmentation benchmark on held-out synthetic scans: the baseline model against two naive detectors.

A standard-space synthetic release (``synthesize(..., flavour="standard")``, pathology on: atrophy, white-matter
hyperintensities, perivascular spaces, ex-vacuo ventricles, CSF-dark lesion cavities with grey-matter-like rims)
is converted (``bids-convert``) and split (``atlas_curate.split``, subject-grouped, stratified by cohort and
lesion-volume quartile). On the same test scans it scores:

* **intensity threshold**: voxels of the template brain darker than ``t`` on the standardised T1 (normalize's
  scale, white-matter peak = 1); ``t`` tuned for the mean DSC over the train + dev scans;
* **darker than median**: voxels where the median image of the training scans minus the scan (both smoothed,
  Gaussian sigma ``--smooth`` mm) exceeds ``t``, inside the template brain; ``t`` tuned on train + dev (the
  training scans made the median, so the tuning flatters it a little);
* **model**: ``train-baseline`` (``--preset``, ``--config``, ``--epochs``) on the split's train scans, or the run
  in ``--run-dir`` when it holds a trained model, segmenting the test scans through ``evaluate``.

Each method is scored on the test scans with :mod:`atlas_curate.metrics` (DSC, 6-connected lesion F1 as the ATLAS
2022 scorer counts lesions, HD95), mean with a 95 % percentile-bootstrap CI, and again after post-processing
(:mod:`atlas_curate.postprocess`: components outside the brain and components under a minimum size removed; the
naive detectors choose the size on train + dev, the model uses its run's choice) when that module is
installed. Then the paired DSC difference of the model and each naive detector on the same scans (bootstrap
CI of its mean; the rows' own CIs overlap at this size), and the mean DSC per lesion-size bin.
``--compare-clean`` runs the naive detectors on a release of the same subjects without pathology
(``synth --no-pathology``) too, and prints both.

    python benchmarks/bench_segmentation.py                                  # 60 subjects, quick preset
    python benchmarks/bench_segmentation.py --skip-model --compare-clean     # the naive detectors only
    python benchmarks/bench_segmentation.py --subjects 12 --fractions 0.5,0.1,0.4 --skip-model --compare-clean
    python benchmarks/bench_segmentation.py --run-dir runs/quick             # reuse (or make) a run
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIZE_BINS_CM3 = (0.0, 1.0, 5.0, 20.0, 60.0, float("inf"))
THRESHOLDS = np.round(np.arange(0.02, 0.90, 0.01), 2)
METRICS = ("dsc", "lesion_f1", "hd95")


# --------------------------------------------------------------------------------------------- data


def build_release(workdir: Path, subjects: int, seed: int, pathology: bool, jobs: int) -> Path:
    """The standard-space release (reused when its truth is already there)."""
    from atlas_curate.synth import synthesize

    name = f"release-standard-s{subjects}-seed{seed}-{'pathology' if pathology else 'clean'}"
    release, truth = workdir / name, workdir / f"{name}-truth"
    if (truth / "truth.json").is_file():
        print(f"[bench] reusing {release}")
        return release
    if release.exists():
        import shutil

        shutil.rmtree(release)
    start = time.perf_counter()
    synthesize(release, subjects=subjects, seed=seed, flavour="standard", truth=truth, jobs=jobs,
               pathology=pathology)
    print(f"[bench] synthesised {release} in {time.perf_counter() - start:.0f} s")
    return release


def convert_and_split(release: Path, seed: int, fractions, jobs: int) -> tuple[Path, Path]:
    from atlas_curate.convert import convert
    from atlas_curate.split import make_split, write_split

    bids = release.with_name(release.name + "-bids")
    result = convert(release, bids, jobs=jobs, progress=False)
    failed = getattr(result, "failed", None)
    if failed:
        print(f"[bench] warning: {len(failed)} scans failed to convert")
    table = make_split(bids, seed=seed, fractions=fractions, progress=False)
    tsv, _ = write_split(table, bids.parent / f"{bids.name}-split.tsv")
    return bids, tsv


@dataclass
class Scans:
    """The split's scans on the template brain: standardised T1 (raw and smoothed) and truth, as vectors."""

    names: list[str]
    split: list[str]
    volume_mm3: np.ndarray
    raw: np.ndarray          # (n, brain voxels) float16
    smooth: np.ndarray
    truth: np.ndarray        # (n, brain voxels) bool
    masks: list[str] = field(default_factory=list)

    def rows(self, *splits: str) -> np.ndarray:
        return np.array([s in splits for s in self.split])


def load_scans(split_tsv: Path, bids: Path, smooth_mm: float) -> Scans:
    import nibabel as nib
    from scipy import ndimage

    from atlas_curate.normalize.pipeline import standardise
    from atlas_curate.split import load_split
    from atlas_curate.templates import template_grid

    brain = template_grid().brain
    table = load_split(split_tsv, bids)
    table = table[table["split"].isin(["train", "dev", "test"])].reset_index(drop=True)
    n, size = len(table), int(brain.sum())
    raw = np.zeros((n, size), np.float16)
    smooth = np.zeros((n, size), np.float16)
    truth = np.zeros((n, size), bool)
    for i, row in enumerate(table.itertuples()):
        image = np.asarray(nib.load(row.t1).dataobj, dtype=np.float32)
        image = standardise(image, brain)[0] / 100.0
        raw[i] = image[brain]
        smooth[i] = (ndimage.gaussian_filter(image, smooth_mm) if smooth_mm > 0 else image)[brain]
        truth[i] = (np.asarray(nib.load(row.mask).dataobj) > 0)[brain]
    return Scans(list(table["scan"]), list(table["split"]), table["lesion_volume_mm3"].to_numpy(float), raw, smooth,
                 truth, list(table["mask"]))


# --------------------------------------------------------------------------------------------- detectors


def dsc_curves(scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """DSC of ``scores >= t`` for every threshold (one scan; histogram counts, so every threshold at once)."""
    edges = np.concatenate([thresholds, [np.inf]])
    scores = scores.astype(np.float32)
    above_all = np.histogram(scores, bins=np.concatenate([[-np.inf], edges]))[0][::-1].cumsum()[::-1][1:]
    above_lesion = np.histogram(scores[truth], bins=np.concatenate([[-np.inf], edges]))[0][::-1].cumsum()[::-1][1:]
    n_truth = int(truth.sum())
    denominator = above_all + n_truth
    return np.where(denominator > 0, 2.0 * above_lesion / np.maximum(denominator, 1), 1.0)


def tune(score_rows, truth_rows, thresholds: np.ndarray) -> tuple[float, float]:
    """The threshold with the best mean DSC over the scans, and that mean."""
    curves = np.mean([dsc_curves(s, t, thresholds) for s, t in zip(score_rows, truth_rows)], axis=0)
    best = int(np.argmax(curves))
    return float(thresholds[best]), float(curves[best])


@dataclass
class Detector:
    short: str
    name: str
    threshold: float
    tuned_dsc: float
    score: callable          # scan index -> score vector (flagged where >= threshold)


def naive_detectors(scans: Scans) -> list[Detector]:
    tuning = np.flatnonzero(scans.rows("train", "dev"))
    # (a) darker than t: score = -intensity, flagged where -intensity >= -t
    def darkness(i):
        return -scans.raw[i].astype(np.float32)

    t, d = tune([darkness(i) for i in tuning], [scans.truth[i] for i in tuning], -THRESHOLDS[::-1])
    threshold = Detector("intensity threshold", f"intensity threshold (T1 <= {-t:.2f} x WM)", t, d, darkness)
    # (b) darker than the training scans' median by more than t
    train = np.flatnonzero(scans.rows("train"))
    median = np.empty(scans.smooth.shape[1], np.float32)
    for start in range(0, median.size, 200_000):
        median[start:start + 200_000] = np.median(scans.smooth[train, start:start + 200_000].astype(np.float32),
                                                  axis=0)

    def below_median(i):
        return median - scans.smooth[i].astype(np.float32)

    t2, d2 = tune([below_median(i) for i in tuning], [scans.truth[i] for i in tuning], THRESHOLDS)
    darker = Detector("darker than median", f"darker than median (by >= {t2:.2f} x WM)", t2, d2, below_median)
    return [threshold, darker]


def truth_grid(scans: Scans, i: int) -> np.ndarray:
    """The scan's whole lesion mask (the vectors hold only its voxels inside the template brain)."""
    import nibabel as nib

    return np.asarray(nib.load(scans.masks[i]).dataobj) > 0


def to_grid(vector: np.ndarray) -> np.ndarray:
    from atlas_curate.templates import template_grid

    brain = template_grid().brain
    out = np.zeros(brain.shape, bool)
    out[brain] = vector
    return out


# --------------------------------------------------------------------------------------------- post-processing


def postprocessing_module():
    """HOOK: :mod:`atlas_curate.postprocess` (drops small components and components outside the brain). Returns
    the module, or ``None`` with the reason printed when it is missing or its interface differs."""
    try:
        from atlas_curate import postprocess as module
    except ImportError as exc:
        print(f"[bench] note: no post-processing rows (atlas_curate.postprocess not available: {exc})")
        return None
    needed = ("PostProcessing", "postprocess", "components", "choose", "brain_region", "load_choice")
    missing = [name for name in needed if not hasattr(module, name)]
    if missing:
        print(f"[bench] note: no post-processing rows (atlas_curate.postprocess lacks {', '.join(missing)})")
        return None
    return module


def choose_rule(module, masks: list[np.ndarray], truths: list[np.ndarray]):
    """The minimum component size with the best mean DSC on the tuning scans (the module's own choice)."""
    brain = module.brain_region(3.0)
    parts = [(module.components(m, brain, truth=t), int(t.sum())) for m, t in zip(masks, truths)]
    sizes = getattr(module, "DEFAULT_SIZES_MM3", (0, 10, 20, 50, 100, 200, 500))
    rule, _ = module.choose(parts, sizes, voxel_mm3=1.0)
    return rule


# --------------------------------------------------------------------------------------------- model


def train_and_predict(bids: Path, split_tsv: Path, run_dir: Path, preset: str, config: str | None,
                      epochs: int | None, device: str) -> tuple[dict[str, Path], dict[str, Path] | None]:
    """Train (or reuse) the run and segment the test scans with ``evaluate``. Returns scan -> the network's
    thresholded mask, and scan -> that mask post-processed by ``evaluate`` with the run's rule (``None`` when this
    version of ``evaluate`` does not post-process)."""
    from atlas_curate.evaluate import evaluate
    from atlas_curate.train import train

    overrides: dict | str | None = config
    if epochs is not None:
        from atlas_curate.train.config import make_config, read_toml

        doc = read_toml(config) if config else {}
        base = make_config(preset, doc).stages[0]
        stages = doc.setdefault("stages", {})
        if isinstance(stages, list):      # a whole stage list: change its first stage
            stage_doc = stages[0]
        else:
            stage_doc = stages.setdefault(base.name, {})
        stage_doc["epochs"] = int(epochs)
        if base.restart_period > epochs:
            stage_doc["restart_period"] = int(epochs)
        if base.snapshot_epochs and max(base.snapshot_epochs) > epochs:
            stage_doc["snapshot_epochs"] = [int(epochs)]
        overrides = doc
    if (run_dir / "run.json").is_file() and (run_dir / "model.pt").is_file():
        print(f"[bench] reusing the trained run {run_dir}")
    else:
        start = time.perf_counter()
        result = train(bids, split_tsv, run_dir, preset=preset, config=overrides, device=device,
                       resume=(run_dir / "config.toml").is_file())
        print(f"[bench] trained in {time.perf_counter() - start:.0f} s: {result.summary()}")
    scored = evaluate(run_dir, split="test", device=device, progress=False)

    def masks(result) -> dict[str, Path]:
        return {row["scan"]: (result.output / row["mask_file"]).resolve() for row in result.scans.to_dict("records")}

    raw = getattr(scored, "raw", None)
    if raw is not None:                    # evaluate post-processed the masks and scored the raw ones apart
        return masks(raw), masks(scored)
    return masks(scored), None


# --------------------------------------------------------------------------------------------- scoring


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    from atlas_curate.metrics import scan_metrics

    row = scan_metrics(pred, truth, (1.0, 1.0, 1.0))
    return {key: row[key] for key in METRICS}


def summary_line(name: str, rows: list[dict]) -> str:
    from atlas_curate.metrics import bootstrap_ci

    parts = [f"{name:<50}", f"{len(rows):>3}"]
    for key in METRICS:
        values = np.array([r[key] for r in rows], float)
        finite = values[~np.isnan(values)]
        if finite.size == 0:
            parts.append(f"{'n/a':>26}")
            continue
        low, high = bootstrap_ci(finite, n_resamples=1000, seed=0)
        extra = f" n={finite.size}" if key == "hd95" and finite.size < len(values) else ""
        parts.append(f"{finite.mean():>7.3f} [{low:.3f}, {high:.3f}]{extra:>5}")
    return "  ".join(parts)


def print_table(title: str, results: dict[str, list[dict]], volumes_mm3: np.ndarray) -> None:
    print(f"\n{title}")
    header = f"{'method':<50}  {'n':>3}  " + "  ".join(f"{k + ' mean [95% CI]':>26}" for k in METRICS)
    print(header)
    for name, rows in results.items():
        print(summary_line(name, rows))
    labels = [f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">={lo:g}" for lo, hi in zip(SIZE_BINS_CM3, SIZE_BINS_CM3[1:])]
    cm3 = volumes_mm3 / 1000.0
    bins = np.digitize(cm3, SIZE_BINS_CM3[1:-1])
    counts = [int((bins == b).sum()) for b in range(len(labels))]
    print(f"\nmean DSC per lesion-size bin (cm³; test scans per bin: "
          f"{', '.join(f'{lab}: {c}' for lab, c in zip(labels, counts))})")
    print(f"{'method':<50}  " + "  ".join(f"{lab:>9}" for lab in labels))
    for name, rows in results.items():
        dsc = np.array([r["dsc"] for r in rows])
        cells = [f"{dsc[bins == b].mean():>9.3f}" if counts[b] else f"{'-':>9}" for b in range(len(labels))]
        print(f"{name:<50}  " + "  ".join(cells))


def print_paired(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Each model row against each naive row on the same test scans: the mean per-scan DSC difference with a
    95 % percentile-bootstrap CI over scans (paired: the scans' own differences are resampled) and the scans
    where the model scores higher / lower. Returns those figures by "model row - naive row"."""
    from atlas_curate.metrics import bootstrap_ci

    models = [name for name in results if name.startswith("model")]
    naive = [name for name in results if not name.startswith("model")]
    if not models or not naive:
        return {}
    print("\npaired DSC difference on the same test scans (model - naive; 95% bootstrap CI over scans)")
    figures = {}
    for m in models:
        for n in naive:
            diff = np.array([a["dsc"] - b["dsc"] for a, b in zip(results[m], results[n])], float)
            low, high = bootstrap_ci(diff, n_resamples=1000, seed=0)
            wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
            figures[f"{m} - {n}"] = {"mean": float(diff.mean()), "ci": [low, high], "model_higher": wins,
                                      "model_lower": losses}
            print(f"  {m.split(' (')[0]:<26} - {n:<50} {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]  "
                  f"higher on {wins}, lower on {losses} of {diff.size}")
    return figures


def naive_results(scans: Scans, post) -> dict[str, list[dict]]:
    test = np.flatnonzero(scans.rows("test"))
    tuning = np.flatnonzero(scans.rows("train", "dev"))
    results: dict[str, list[dict]] = {}
    for det in naive_detectors(scans):
        print(f"[bench] {det.name}: tuned on {len(tuning)} train+dev scans, mean DSC there {det.tuned_dsc:.3f}")
        preds = {i: to_grid(det.score(i) >= det.threshold) for i in test}
        truths = {i: truth_grid(scans, i) for i in test}
        results[det.name] = [score(preds[i], truths[i]) for i in test]
        if post is not None:
            tune_masks = [to_grid(det.score(i) >= det.threshold) for i in tuning]
            rule = choose_rule(post, tune_masks, [truth_grid(scans, i) for i in tuning])
            del tune_masks
            results[f"{det.short} + post-processing (>= {rule.min_size_mm3:g} mm³)"] = [
                score(post.postprocess(preds[i], rule)[0], truths[i]) for i in test]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=60, help="subjects in the release (default 60: ~80 scans)")
    parser.add_argument("--seed", type=int, default=0, help="generator and split seed")
    parser.add_argument("--fractions", default="0.7,0.1,0.2",
                        help="train,dev,test fractions of the split (default 0.7,0.1,0.2: 16 test scans of 80)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "atlas-curate-bench-segmentation",
                        help="where releases, BIDS datasets, splits and the run go (reused when present; default "
                             "$TMPDIR/atlas-curate-bench-segmentation)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--smooth", type=float, default=1.0, help="Gaussian sigma (mm) of the median detector")
    parser.add_argument("--preset", default="quick", choices=["quick", "paper"])
    parser.add_argument("--config", default=None, help="TOML overrides for train-baseline")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the first training stage")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="training run folder (default WORKDIR/run-PRESET); a trained run there is reused")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-model", action="store_true", help="only the naive detectors")
    parser.add_argument("--compare-clean", action="store_true",
                        help="also run the naive detectors on the same subjects without pathology")
    parser.add_argument("--min-test", type=int, default=12, help="warn below this many test scans")
    args = parser.parse_args(argv)

    from atlas_curate.split import parse_fractions

    fractions = parse_fractions(args.fractions)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print("[bench] command: python benchmarks/bench_segmentation.py " + " ".join(shlex.quote(a) for a in
                                                                               (argv or sys.argv[1:])))
    post = postprocessing_module()

    release = build_release(workdir, args.subjects, args.seed, True, args.jobs)
    bids, split_tsv = convert_and_split(release, args.seed, fractions, args.jobs)
    scans = load_scans(split_tsv, bids, args.smooth)
    test = np.flatnonzero(scans.rows("test"))
    volumes = scans.volume_mm3[test]
    print(f"[bench] {len(scans.names)} scans: train {int(scans.rows('train').sum())}, dev "
          f"{int(scans.rows('dev').sum())}, test {len(test)}; test lesion volumes "
          f"{volumes.min() / 1000:.2f}-{volumes.max() / 1000:.1f} cm³")
    if len(test) < args.min_test:
        print(f"[bench] warning: only {len(test)} test scans (< {args.min_test}): more --subjects or a larger test "
              "fraction")
    if volumes.min() > 1000.0 or volumes.max() < 60000.0:
        print("[bench] warning: the test lesions do not span 1 to 60 cm³; another --seed may")

    results = naive_results(scans, post)
    if not args.skip_model:
        import nibabel as nib

        run_dir = (args.run_dir or workdir / f"run-{args.preset}").resolve()
        raw, processed = train_and_predict(bids, split_tsv, run_dir, args.preset, args.config, args.epochs,
                                           args.device)
        truths = {scans.names[i]: truth_grid(scans, i) for i in test}
        preds = {name: np.asarray(nib.load(raw[name]).dataobj) > 0 for name in truths}
        results[f"model ({run_dir.name})"] = [score(preds[n], truths[n]) for n in truths]
        chosen = post.load_choice(run_dir) if post is not None else None
        if processed is not None:          # evaluate's own post-processed masks, with the run's rule
            size = f" (>= {chosen[0].min_size_mm3:g} mm³)" if chosen else ""
            results[f"model + post-processing{size}"] = [
                score(np.asarray(nib.load(processed[n]).dataobj) > 0, truths[n]) for n in truths]
        elif chosen is not None:
            results[f"model + post-processing (>= {chosen[0].min_size_mm3:g} mm³)"] = [
                score(post.postprocess(preds[n], chosen[0])[0], truths[n]) for n in truths]
        elif post is not None:
            print("[bench] note: the run chose no post-processing (no postprocess.json): no model row after it")
    print_table(f"test scans of {release.name} ({len(test)} scans; lesion F1: 6-connected, the ATLAS 2022 scorer)",
                results, volumes)
    paired = print_paired(results)
    doc = {"release": str(release), "split": str(split_tsv), "test_scans": [scans.names[i] for i in test],
           "results": {k: v for k, v in results.items()}, "paired_dsc_difference": paired}

    if args.compare_clean:
        del scans
        clean = build_release(workdir, args.subjects, args.seed, False, args.jobs)
        clean_bids, clean_split = convert_and_split(clean, args.seed, fractions, args.jobs)
        clean_scans = load_scans(clean_split, clean_bids, args.smooth)
        clean_results = naive_results(clean_scans, post)
        clean_test = np.flatnonzero(clean_scans.rows("test"))
        print_table(f"the same subjects without pathology ({clean.name}, {len(clean_test)} test scans)",
                    clean_results, clean_scans.volume_mm3[clean_test])
        print("\nnaive detectors, mean test DSC: pathology vs clean")
        for name in results:
            match = next((c for c in clean_results if c.split(" (")[0] == name.split(" (")[0]), None)
            if match is None:
                continue
            a = np.mean([r["dsc"] for r in results[name]])
            b = np.mean([r["dsc"] for r in clean_results[match]])
            print(f"  {name.split(' (')[0]:<44} {a:.3f} (pathology)  {b:.3f} (clean)")
        doc["clean"] = {"release": str(clean), "results": clean_results}
    out = workdir / f"bench-segmentation-s{args.subjects}-seed{args.seed}.json"
    out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"\n[bench] per-scan figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
