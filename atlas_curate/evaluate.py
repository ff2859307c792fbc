"""``evaluate``: segment a split of a trained run and score it against the manual masks.

For every scan of the split (``test`` by default) the run's final model (or, with ``ensemble``, the mean
probability of the snapshots of its last stage) segments the template-space T1w by sliding-window
inference over the whole volume; the probability is taken back to the 1 mm template grid and thresholded
at the run's ``threshold`` (0.5). Metrics are always computed on the 1 mm template grid against the
template-space mask, with distances in mm from the voxel spacing (:mod:`atlas_curate.metrics`, whose
docstring defines every metric and the empty-mask cases: both empty → DSC 1, distances 0; exactly one
empty → DSC 0, distances undefined (NaN, left out of the summaries, whose ``n`` says how many scans count)).

Outputs in ``RUN_DIR/eval-<split>[-ensemble]/``:

* ``scans.tsv``: one row per scan: identifiers, metadata (cohort, vascular territory, primary lesion
  location), the lesion-size quartile, all :func:`~atlas_curate.metrics.scan_metrics` columns and the
  prediction files;
* ``summary.tsv`` / ``summary.json``: per metric the mean and the median with seeded percentile bootstrap
  95% confidence intervals (1000 resamples over scans), the micro-averaged DSC (voxels pooled over scans),
  and the ATLAS 2022 challenge metrics (DSC, lesion-wise F1, lesion count difference, absolute volume
  difference) beside the challenge winner's (:data:`~atlas_curate.metrics.CHALLENGE_WINNER`);
* ``by_size_quartile.tsv`` (Tomita et al. 2020, Table 4: the scans in four groups of equal size by
  manual lesion volume, Q1 smallest), ``by_vascular_territory.tsv``, ``by_primary_lesion_location.tsv``
  (when the metadata has the column): per group ``n``, volume range, mean and median DSC, micro DSC,
  mean HD95, ASSD, TPR, precision and lesion F1;
* ``dsc_vs_volume.png``: DSC against manual lesion volume (log x); scans with an empty mask are listed in
  the title instead (no place on a log axis);
* ``predictions/``: ``<scan>_space-MNI152NLin2009aSym_label-L_desc-ResUNet_mask.nii.gz`` (uint8) and
  ``..._label-L_desc-ResUNet_probseg.nii.gz`` (float32 probabilities).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import io, naming

SPACE = "MNI152NLin2009aSym"
DESC = "ResUNet"
SUMMARY_METRICS = ("dsc", "hd", "hd95", "assd", "tpr", "precision", "volume_pred_mm3", "volume_truth_mm3",
                   "abs_volume_diff_mm3", "lesion_f1", "lesion_count_diff")
SCAN_NAME = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?$")
GROUP_COLUMNS = ("vascular_territory", "primary_lesion_location")
META_COLUMNS = ("subject", "session", "cohort", "vascular_territory", "primary_lesion_location",
                "primary_lesion_hemisphere")


@dataclass
class EvalResult:
    output: Path
    scans: pd.DataFrame
    summary: pd.DataFrame
    micro_dsc: float
    tables: dict[str, Path] = field(default_factory=dict)
    figure: Path | None = None

    def text(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{len(self.scans)} scans evaluated -> {self.output}"]
        for metric in ("dsc", "hd95", "assd", "tpr", "precision", "lesion_f1"):
            row = self.summary[self.summary["metric"] == metric]
            if len(row):
                r = row.iloc[0]
                lines.append(f"  {metric:<10} mean {r['mean']:.3f} [{r['mean_ci_low']:.3f}, {r['mean_ci_high']:.3f}]"
                             f"  median {r['median']:.3f}  (n={int(r['n'])})")
        lines.append(f"  micro DSC  {self.micro_dsc:.3f}")
        return "\n".join(lines)


def prediction_names(scan: str) -> dict[str, str]:
    """BIDS-derivative file names of a scan's predicted mask and probability map (``scan`` is ``sub-X_ses-Y``)."""
    match = SCAN_NAME.match(scan)
    if match:
        sub, ses = match["sub"], match["ses"]
        return {"mask": naming.bids_name(sub, ses, "mask", ".nii.gz", space=SPACE, label="L", desc=DESC),
                "probseg": naming.bids_name(sub, ses, "probseg", ".nii.gz", space=SPACE, label="L", desc=DESC)}
    return {"mask": f"{scan}_space-{SPACE}_label-L_desc-{DESC}_mask.nii.gz",
            "probseg": f"{scan}_space-{SPACE}_label-L_desc-{DESC}_probseg.nii.gz"}


def save_prediction(prob: np.ndarray, threshold: float, affine: np.ndarray, paths: dict[str, Path]) -> np.ndarray:
    """Write the mask (``prob >= threshold``, uint8) and the probabilities (float32); returns the mask."""
    import nibabel as nib

    mask = prob >= threshold
    for key, data, dtype in (("mask", mask, np.uint8), ("probseg", prob, np.float32)):
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
        img.set_sform(affine, code=4)
        img.set_qform(affine, code=4)
        img.header.set_xyzt_units("mm", "sec")
        io.save_nifti(img, paths[key])
    return mask


@dataclass(frozen=True)
class MetricJob:
    scan: str
    prediction: str
    truth: str


def score_scan(job: MetricJob) -> dict:
    """All per-scan metrics of one saved prediction against its manual mask (same grid required)."""
    from .metrics import scan_metrics, spacing_of

    pred, pred_img = io.read_mask(job.prediction)
    truth, truth_img = io.read_mask(job.truth)
    problem = io.grid_difference(pred_img, truth_img)
    if problem:
        raise io.InputError(job.truth, f"manual mask is not on the template grid of the prediction: {problem}")
    return scan_metrics(pred, truth, spacing_of(truth_img))


def size_quartiles(volumes: pd.Series) -> pd.Series:
    """``Q1``..``Q4`` by manual lesion volume (equal-count groups; ties broken by order), Q1 the smallest.

    With fewer than four scans there are as many groups as scans."""
    groups = min(4, len(volumes))
    if groups == 0:
        return pd.Series([], dtype=object)
    ranks = volumes.rank(method="first")
    labels = [f"Q{i + 1}" for i in range(groups)]
    return pd.qcut(ranks, groups, labels=labels).astype(str) if groups > 1 else pd.Series(["Q1"] * len(volumes),
                                                                                          index=volumes.index)


def group_table(scans: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per value of ``column``: n, manual volume range, DSC mean/median/micro, mean distances and rates."""
    from .metrics import micro_dsc

    rows = []
    for value, group in scans.groupby(column, sort=True, dropna=False):
        rows.append({
            column: "n/a" if pd.isna(value) else value,
            "n": len(group),
            "volume_min_mm3": group["volume_truth_mm3"].min(),
            "volume_max_mm3": group["volume_truth_mm3"].max(),
            "dsc_mean": group["dsc"].mean(),
            "dsc_median": group["dsc"].median(),
            "dsc_micro": micro_dsc(group),
            "hd95_mean": group["hd95"].mean(),
            "assd_mean": group["assd"].mean(),
            "tpr_mean": group["tpr"].mean(),
            "precision_mean": group["precision"].mean(),
            "lesion_f1_mean": group["lesion_f1"].mean(),
        })
    return pd.DataFrame(rows)


def _one_two_five(value: float, _position=None) -> str:
    """Minor tick labels of a log axis at 2 and 5 times a power of ten (plain numbers, no exponents)."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** np.floor(np.log10(value)))
    return f"{value:g}" if leading in (2, 5) else ""


def dsc_volume_figure(scans: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    shown = scans[scans["volume_truth_mm3"] > 0]
    empty = scans[~(scans["volume_truth_mm3"] > 0)]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for quartile, group in shown.groupby("size_quartile"):
        ax.scatter(group["volume_truth_mm3"] / 1000.0, group["dsc"], s=22, label=str(quartile), alpha=0.85)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(_one_two_five))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("manual lesion volume (cm³, log scale)")
    ax.set_ylabel("DSC")
    if len(empty):
        title += f"\n{len(empty)} scan(s) with an empty manual mask not shown"
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if len(shown):
        ax.legend(title="size quartile", fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def _metadata(bids_root: Path, scans: list[str]) -> pd.DataFrame:
    from .dataset import scan_table

    table = scan_table(bids_root, include_failed=True)
    columns = ["scan"] + [c for c in META_COLUMNS if c in table.columns]
    return table[table["scan"].isin(scans)][columns]


def _write_tsv(table: pd.DataFrame, path: Path) -> Path:
    return io.write_text(table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"), path)


def _finite(value):
    return None if isinstance(value, float) and not np.isfinite(value) else value


def evaluate(run_dir: os.PathLike | str, *, split: str = "test", ensemble: bool = False, jobs: int = 1,
             device: str = "auto", progress: bool = True, n_resamples: int = 1000, seed: int = 0) -> EvalResult:
    """Segment and score the ``split`` scans of a training run; see the module docstring."""
    from tqdm.auto import tqdm

    from .executor import run_map
    from .metrics import CHALLENGE_WINNER, micro_dsc, summarize
    from .train.data import read_split, template_affine
    from .train.infer import RUN_FILE, load_segmenter

    run_dir = Path(run_dir).resolve()
    if not (run_dir / RUN_FILE).is_file():
        raise io.InputError(run_dir / RUN_FILE, "not a training run folder (run.json missing)")
    run = json.loads((run_dir / RUN_FILE).read_text())
    bids_root = Path(run["bids_root"])
    table = read_split(run["splits"], bids_root)
    if split == "dev" and run.get("fold") is not None:    # cross-validation run: its dev set is its fold
        folds = pd.to_numeric(table.get("fold"), errors="coerce")
        chosen = (table["split"].astype(str) == "train") & (folds == int(run["fold"]))
    else:
        chosen = table["split"].astype(str) == split
    rows = table[chosen].sort_values("scan").reset_index(drop=True)
    if rows.empty:
        known = sorted(table["split"].astype(str).unique())
        raise io.InputError(run["splits"], f"no scans in split {split!r} (splits: {', '.join(known)})")
    rows = rows[rows["mask"].notna()].reset_index(drop=True)
    if rows.empty:
        raise io.InputError(run["splits"], f"no scan of split {split!r} has a manual mask to score against")
    segmenter = load_segmenter(run_dir, ensemble=ensemble, device=device)
    out = run_dir / f"eval-{split}{'-ensemble' if ensemble else ''}"
    affine = template_affine()
    from .train.data import nib_template

    template = nib_template()
    meta = _metadata(bids_root, rows["scan"].tolist())
    rows = rows.merge(meta[[c for c in meta.columns if c == "scan" or c not in rows.columns]], on="scan", how="left")

    jobs_list, records = [], []
    for row in tqdm(rows.to_dict("records"), desc="predict", disable=not progress):
        t1_img = io.load_nifti(row["t1"])
        problem = io.grid_difference(template, t1_img)
        if problem:
            raise io.InputError(row["t1"], f"not on the {SPACE} grid: {problem}")
        prob = segmenter.probability(np.asarray(t1_img.dataobj, dtype=np.float32))
        names = prediction_names(row["scan"])
        paths = {k: out / "predictions" / v for k, v in names.items()}
        save_prediction(prob, segmenter.config.threshold, affine, paths)
        jobs_list.append(MetricJob(row["scan"], str(paths["mask"]), row["mask"]))
        records.append({**{k: row.get(k) for k in ("scan", *META_COLUMNS) if k in row},
                        "mask_file": paths["mask"].relative_to(out).as_posix(),
                        "probseg_file": paths["probseg"].relative_to(out).as_posix()})
    outcomes = run_map(score_scan, jobs_list, key=lambda j: j.scan, jobs=jobs, desc="metrics", progress=progress)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("scoring failed: " + "; ".join(f"{o.key}: {o.reason}" for o in failed))
    scans = pd.DataFrame([{**rec, **o.value} for rec, o in zip(records, outcomes)])
    scans.insert(1, "size_quartile", size_quartiles(scans["volume_truth_mm3"]).to_numpy())
    scans = scans[[c for c in scans.columns if c not in ("mask_file", "probseg_file")] + ["mask_file", "probseg_file"]]

    summary = summarize(scans, list(SUMMARY_METRICS), n_resamples=n_resamples, seed=seed)
    micro = micro_dsc(scans)
    tables = {"scans": _write_tsv(scans, out / "scans.tsv"), "summary": _write_tsv(summary, out / "summary.tsv")}
    quartiles = group_table(scans, "size_quartile").rename(columns={"size_quartile": "quartile"})
    tables["by_size_quartile"] = _write_tsv(quartiles, out / "by_size_quartile.tsv")
    for column in GROUP_COLUMNS:
        if column in scans.columns:
            tables[f"by_{column}"] = _write_tsv(group_table(scans, column), out / f"by_{column}.tsv")
    means = summary.set_index("metric")["mean"]
    doc = {
        "run": str(run_dir), "split": split, "ensemble": ensemble, "models": segmenter.sources,
        "n_scans": len(scans), "micro_dsc": micro, "bootstrap": {"n_resamples": n_resamples, "seed": seed,
                                                                 "level": 0.95},
        "metrics": {r["metric"]: {k: _finite(v) for k, v in r.items() if k != "metric"}
                    for r in summary.to_dict("records")},
        "challenge": {metric: {"ours_mean": _finite(float(means.get(metric, np.nan))), "winner": value}
                      for metric, value in CHALLENGE_WINNER.items()},
    }
    tables["summary_json"] = io.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", out / "summary.json")
    title = (f"{split}{' (snapshot ensemble)' if ensemble else ''}: mean DSC {means.get('dsc', np.nan):.3f}, "
             f"micro DSC {micro:.3f}, n = {len(scans)}")
    figure = dsc_volume_figure(scans, out / "dsc_vs_volume.png", title)
    return EvalResult(out, scans, summary, micro, tables, figure)
