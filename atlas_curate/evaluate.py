"""``evaluate``: score lesion masks of a split against the manual masks, with the challenge's metrics.

Two sources of predicted masks, scored identically (same scans, metrics, confidence intervals and tables, so
the figures are directly comparable):

* a training run (``evaluate(RUN_DIR)``): for every scan of the split (``test`` by default) the run's final
  model (or, with ``ensemble``, the mean probability of the snapshots of its last stage) segments the
  template-space T1w by sliding-window inference over the whole volume; the probability is taken back to the
  1 mm template grid and thresholded at the run's ``threshold`` (0.5), the *raw* mask, which the run's
  post-processing (``RUN_DIR/postprocess.json``, :mod:`atlas_curate.postprocess`: components outside the
  brain and below the minimum size chosen on the dev scans removed) turns into the mask scored, as ``predict``
  delivers it (with ``ensemble`` too: the rule chosen for ``model.pt``). The raw masks are scored too, with
  the same tables (``raw/``), and both are reported side by side. A run without ``postprocess.json``
  (trained by an older version) is scored on its raw masks only;
* a folder of masks from any model (:func:`evaluate_predictions`), e.g. nnU-Net's predictions for the
  ``imagesTs`` of ``export nnunet``. A file belongs to a scan when its name (without ``.nii``/``.nii.gz``)

  - is a case id of the export's ``cases.tsv`` (``r001s001ses1.nii.gz``; the table maps case → scan; it is
    ``cases`` when given, else the first ``cases.tsv`` found in the folder or a folder above it, else in or
    above the input folder that ``nnUNetv2_predict`` recorded in the folder's
    ``predict_from_raw_data_args.json``, see :func:`find_cases_table`), or
  - is the scan name (``sub-X_ses-Y``, or ``sub-X`` without a session), or a BIDS-style mask name of the scan
    (``sub-X[_ses-Y][_...]_mask``, as ``evaluate`` and ``predict`` write them; a ``space-`` entity other than
    the template space is not taken).

  The folder is searched recursively. Every scan of the split must have exactly one prediction, readable and
  on the grid of its manual mask (shape, and affine within 1e-3 mm; nothing is resampled); otherwise nothing
  is scored and the error names each file (or missing scan) with the reason. NIfTI files that are not used
  are listed with the reason in ``prediction_files.tsv``.

Scans, truth and metadata come from the split table (``split``'s TSV; its ``t1``/``mask`` paths relative to
the BIDS root, which is the run's, or given, or the nearest folder above the split file holding a
``dataset_description.json`` outside ``derivatives/``) and the BIDS dataset's participants/sessions tables.
Metrics are computed on the grid of the manual masks (the 1 mm template grid), with distances in mm from the
voxel spacing (:mod:`atlas_curate.metrics`, whose docstring defines every metric, whose convention it is, and
the empty-mask cases: both empty → DSC 1, lesion F1 1, distances 0; exactly one empty → DSC 0, distances
undefined (NaN, left out of the summaries, whose ``n`` says how many scans count)).

Lesion-wise figures (lesion F1, lesion count difference) use ``connectivity`` 6 by default: 6-connected
lesions, as the ATLAS R2.0 / MICCAI 2022 challenge scorer labels them; ``connectivity=26`` gives the ISLES'22
convention. The connectivity is written into every table (a ``lesion_connectivity`` column), into
``summary.json`` and into the printed summary. The comparison with the 2022 challenge winner is made only with
connectivity 6, the challenge's own.

Outputs in ``RUN_DIR/eval-<split>[-ensemble]/`` (or, for a folder of predictions, ``PREDICTIONS/eval-<split>/``
unless ``output`` is given):

* ``scans.tsv``: one row per scan: identifiers, metadata (cohort, vascular territory, primary lesion
  location), the lesion-size quartile, all :func:`~atlas_curate.metrics.scan_metrics` columns and the
  prediction file(s);
* ``summary.tsv`` / ``summary.json``: per metric the mean and the median with seeded percentile bootstrap
  95% confidence intervals (1000 resamples over scans), the micro-averaged DSC (voxels pooled over scans),
  the lesion connectivity, and (connectivity 6 only) the ATLAS 2022 challenge metrics (DSC, lesion-wise F1,
  lesion count difference, absolute volume difference in voxels) beside the challenge winner's
  (:data:`~atlas_curate.metrics.CHALLENGE_WINNER`);
* ``by_cohort.tsv`` (per cohort, i.e. site), ``by_size_quartile.tsv`` (Tomita et al. 2020, Table 4: the scans
  in four groups of equal size by manual lesion volume, Q1 smallest), ``by_vascular_territory.tsv``,
  ``by_primary_lesion_location.tsv`` (each when the column exists): per group ``n``, volume range, mean and
  median DSC, micro DSC, mean HD95, ASSD, TPR, precision, lesion F1 (mean and median), lesion count
  difference and volume difference in voxels; the cohort and quartile tables are also printed;
* ``dsc_vs_volume.png``: DSC against manual lesion volume (log x); scans with an empty mask are listed in
  the title instead (no place on a log axis);
* a run's ``predictions/``: the naming spec's ``prediction_mask``
  (``<scan>_space-<template>_label-L_desc-ResUNet_mask.nii.gz``, uint8, post-processed), ``prediction_mask_raw``
  (``..._desc-ResUNetRaw_mask.nii.gz``, the thresholded probabilities) and ``prediction_probseg``
  (``..._probseg.nii.gz``, float32 probabilities); for a folder of predictions,
  ``prediction_files.tsv``: every NIfTI file found, the scan it was taken for, or why it was not used;
* for a run with post-processing: ``raw/`` with ``scans.tsv``, ``summary.tsv``/``summary.json``, the group
  tables and the figure of the raw masks (file columns relative to ``raw/``); ``postprocess.tsv``, one row per
  scan with the components found and removed (small, outside the brain), the voxels removed and the main
  metrics without (``_raw``) and with post-processing; ``summary.json`` then holds ``postprocessing`` (the rule,
  where it was chosen, why) and ``raw`` (the raw masks' micro DSC, metric summaries and challenge comparison).

In a folder of predictions, a mask whose ``desc-`` label ends in ``Raw`` (``desc-ResUNetRaw``, the raw mask
``predict`` and ``evaluate`` write beside the post-processed one, or ``desc-T1lesionRaw``) is used only for a
scan that has no other mask.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import io, naming
from .index import refresh_index
from .naming import SPACE, ScanRef
from .tables import read_json, read_tsv, write_json, write_tsv

PREDICTION_OUTPUTS = {"mask": "prediction_mask", "probseg": "prediction_probseg"}   # kind -> naming-spec key
RAW_OUTPUT = "prediction_mask_raw"     # the raw mask beside a post-processed one (kind ``mask_raw``)
POSTPROCESS_METRICS = ("dsc", "lesion_f1", "lesion_count_diff", "abs_volume_diff_voxels", "volume_pred_mm3", "hd95")
FLOAT_FORMAT = "%.6g"
SUMMARY_METRICS = ("dsc", "hd", "hd95", "hd95_pooled", "assd", "tpr", "precision", "volume_pred_mm3",
                   "volume_truth_mm3", "abs_volume_diff_mm3", "abs_volume_diff_voxels", "lesion_f1",
                   "lesion_count_diff")
PRINTED_METRICS = ("dsc", "hd95", "hd95_pooled", "assd", "tpr", "precision", "lesion_f1", "lesion_count_diff",
                   "abs_volume_diff_voxels")
NIFTI = re.compile(r"\.nii(?:\.gz)?$")
GROUP_COLUMNS = ("cohort", "vascular_territory", "primary_lesion_location")
META_COLUMNS = ("subject", "session", "cohort", "vascular_territory", "primary_lesion_location",
                "primary_lesion_hemisphere")
CASES_FILE = "cases.tsv"
NNUNET_PREDICT_ARGS = "predict_from_raw_data_args.json"   # written by nnUNetv2_predict into its output folder
CONNECTIVITY_COLUMN = "lesion_connectivity"


@dataclass
class EvalResult:
    output: Path
    scans: pd.DataFrame
    summary: pd.DataFrame
    micro_dsc: float
    tables: dict[str, Path] = field(default_factory=dict)
    figure: Path | None = None
    connectivity: int = 6
    groups: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    raw: "EvalResult | None" = None        # the raw masks' scores, when the masks were post-processed
    postprocessing: dict | None = None     # summary.json's ``postprocessing``

    def text(self) -> str:
        """The summary for the terminal: metrics with CIs, DSC and lesion F1 per cohort and per size quartile,
        and (connectivity 6 only) the challenge winner's scores beside ours."""
        from .metrics import CHALLENGE_WINNER, LESION_CONVENTIONS

        lines = [f"{len(self.scans)} scans evaluated -> {self.output}",
                 f"lesion-wise figures: {LESION_CONVENTIONS[self.connectivity]}"]
        if self.postprocessing is not None:
            lines.append(f"post-processing: {self.postprocessing['description']} ({self.postprocessing['reason']}); "
                         f"the raw masks are scored in {self.raw.output if self.raw else 'raw/'}")
        for metric in PRINTED_METRICS:
            row = self.summary[self.summary["metric"] == metric]
            if len(row):
                r = row.iloc[0]
                lines.append(f"  {metric:<22} mean {r['mean']:.3f} [{r['mean_ci_low']:.3f}, {r['mean_ci_high']:.3f}]"
                             f"  median {r['median']:.3f}  (n={int(r['n'])})")
        lines.append(f"  {'micro DSC':<22} {self.micro_dsc:.3f}")
        if self.raw is not None:
            lines.append("with and without post-processing (means):")
            ours = self.summary.set_index("metric")["mean"]
            raw = self.raw.summary.set_index("metric")["mean"]
            for metric in PRINTED_METRICS:
                if metric in ours.index:
                    lines.append(f"  {metric:<22} post-processed {ours[metric]:.3f}  raw {raw.get(metric, np.nan):.3f}")
            lines.append(f"  {'micro DSC':<22} post-processed {self.micro_dsc:.3f}  raw {self.raw.micro_dsc:.3f}")
        for key, title in (("cohort", "by cohort"), ("size_quartile", "by lesion-size quartile (manual volume)")):
            table = self.groups.get(key)
            if table is None or table.empty:
                continue
            lines.append(f"{title}:")
            label = table.columns[0]
            width = max(8, *(len(str(v)) for v in table[label]))
            lines.append(f"  {'':<{width}}  {'n':>4}  {'volume mm³':>17}  {'DSC mean':>8}  {'median':>6}  "
                         f"{'lesion F1':>9}")
            for r in table.to_dict("records"):
                volumes = f"{r['volume_min_mm3']:.0f}-{r['volume_max_mm3']:.0f}"
                lines.append(f"  {str(r[label]):<{width}}  {int(r['n']):>4}  {volumes:>17}  {r['dsc_mean']:>8.3f}  "
                             f"{r['dsc_median']:>6.3f}  {r['lesion_f1_mean']:>9.3f}")
        if self.connectivity == 6:
            means = self.summary.set_index("metric")["mean"]
            lines.append("ATLAS 2022 challenge winner (test-set means) vs these scans:")
            for metric, value in CHALLENGE_WINNER.items():
                ours = float(means.get(metric, np.nan))
                lines.append(f"  {metric:<22} winner {value:g}  here {ours:.4g}")
        else:
            lines.append("(no comparison with the ATLAS 2022 challenge winner: the challenge counts 6-connected "
                         "lesions)")
        lines.extend(self.notes)
        return "\n".join(lines)


def prediction_names(scan: str, *, raw: bool = False) -> dict[str, str]:
    """File names of a scan's predicted mask and probability map (naming spec ``prediction_mask`` and
    ``prediction_probseg`` in the template space; with ``raw``, also ``mask_raw``: ``prediction_mask_raw``);
    ``scan`` is ``sub-X[_ses-Y]`` (another name is used as the name's start)."""
    try:
        ref, start = ScanRef.parse(scan), None
    except ValueError:
        ref, start = ScanRef("scan"), scan
    outputs = {**PREDICTION_OUTPUTS, "mask_raw": RAW_OUTPUT} if raw else PREDICTION_OUTPUTS
    names = {kind: ref.path(output, space=SPACE).name for kind, output in outputs.items()}
    return names if start is None else {kind: start + name[len(ref.key):] for kind, name in names.items()}


def save_prediction(prob: np.ndarray, threshold: float, paths: dict[str, Path], postprocessing=None
                    ) -> tuple[np.ndarray, dict | None]:
    """Write the mask (``prob >= threshold``, post-processed with ``postprocessing`` when given, the raw mask
    then to ``paths["mask_raw"]``) and the probabilities on the template grid, in the naming spec's dtypes
    (uint8, float32); returns the mask and the post-processing report (None without post-processing)."""
    from .postprocess import postprocess
    from .templates import template_grid

    mask = prob >= threshold
    outputs = {"mask": (mask, PREDICTION_OUTPUTS["mask"]), "probseg": (prob, PREDICTION_OUTPUTS["probseg"])}
    report = None
    if postprocessing is not None:
        cleaned, report = postprocess(mask, postprocessing)
        outputs.update(mask=(cleaned, PREDICTION_OUTPUTS["mask"]), mask_raw=(mask, RAW_OUTPUT))
        mask = cleaned
    for kind, (data, output) in outputs.items():
        io.save_nifti(template_grid().image(data, naming.output_spec(output)["dtype"]), paths[kind])
    return mask, report


@dataclass(frozen=True)
class MetricJob:
    scan: str
    prediction: str
    truth: str
    connectivity: int = 6


def score_scan(job: MetricJob) -> dict:
    """All per-scan metrics of one saved prediction against its manual mask (same grid required).

    The prediction is ``> 0`` of its stored values, which must be whole numbers (a label map; a probability
    map is refused rather than binarised at an arbitrary level)."""
    from .metrics import scan_metrics, spacing_of

    pred, values, pred_img = io.read_mask_values(job.prediction)
    fractional = values[np.mod(values, 1) != 0]
    if fractional.size:
        raise io.InputError(job.prediction, f"not a label mask: it stores non-integer values (e.g. "
                                            f"{float(fractional[0]):g}); a probability map must be thresholded first")
    truth, truth_img = io.read_mask(job.truth)
    problem = io.grid_difference(truth_img, pred_img)
    if problem:
        raise io.InputError(job.prediction, f"not on the grid of the manual mask {job.truth}: {problem}")
    return scan_metrics(pred, truth, spacing_of(truth_img), connectivity=job.connectivity)


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
    """Per value of ``column``: n, manual volume range, DSC mean/median/micro, mean distances and rates, lesion F1
    (mean, median) and, when the scans have them, the mean lesion count and volume (voxel) differences."""
    from .metrics import micro_dsc

    rows = []
    for value, group in scans.groupby(column, sort=True, dropna=False):
        row = {
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
            "lesion_f1_median": group["lesion_f1"].median(),
        }
        for metric in ("lesion_count_diff", "abs_volume_diff_voxels"):
            if metric in group.columns:
                row[f"{metric}_mean"] = group[metric].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _one_two_five(value: float, _position=None) -> str:
    """Minor tick labels of a log axis at 2 and 5 times a power of ten (plain numbers, no exponents)."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** np.floor(np.log10(value)))
    return f"{value:g}" if leading in (2, 5) else ""


def dsc_volume_figure(scans: pd.DataFrame, path: Path, title: str) -> Path:
    """DSC against manual lesion volume: a :class:`matplotlib.figure.Figure` drawn with the Agg canvas (no
    pyplot), saved without the ``Software`` tag."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    shown = scans[scans["volume_truth_mm3"] > 0]
    empty = scans[~(scans["volume_truth_mm3"] > 0)]
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
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
    return path


def _metadata(bids_root: Path, scans: list[str]) -> pd.DataFrame:
    from .dataset import scan_table

    table = scan_table(bids_root, include_failed=True)
    columns = ["scan"] + [c for c in META_COLUMNS if c in table.columns]
    return table[table["scan"].isin(scans)][columns]


def _save_table(table: pd.DataFrame, path: Path, connectivity: int) -> Path:
    """``table`` with its ``lesion_connectivity`` column, as TSV."""
    return write_tsv(table.assign(**{CONNECTIVITY_COLUMN: int(connectivity)}), path, float_format=FLOAT_FORMAT)


def _finite(value):
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _chosen_rows(table: pd.DataFrame, split: str, fold, source: os.PathLike | str) -> pd.DataFrame:
    """The scans of ``split`` that have a manual mask, sorted by scan (``fold``: a cross-validation run's dev set)."""
    if split == "dev" and fold is not None:    # cross-validation run: its dev set is its fold
        folds = pd.to_numeric(table.get("fold"), errors="coerce")
        chosen = (table["split"].astype(str) == "train") & (folds == int(fold))
    else:
        chosen = table["split"].astype(str) == split
    rows = table[chosen].sort_values("scan").reset_index(drop=True)
    if rows.empty:
        known = sorted(table["split"].astype(str).unique())
        raise io.InputError(source, f"no scans in split {split!r} (splits: {', '.join(known)})")
    rows = rows[rows["mask"].notna()].reset_index(drop=True)
    if rows.empty:
        raise io.InputError(source, f"no scan of split {split!r} has a manual mask to score against")
    return rows


def _with_metadata(rows: pd.DataFrame, bids_root: Path | None) -> pd.DataFrame:
    if bids_root is None:
        return rows
    meta = _metadata(bids_root, rows["scan"].tolist())
    return rows.merge(meta[[c for c in meta.columns if c == "scan" or c not in rows.columns]], on="scan", how="left")


def _score(rows: pd.DataFrame, predictions: list[str], records: list[dict], out: Path, *, file_columns: list[str],
           doc: dict, title: str, jobs: int, progress: bool, n_resamples: int, seed: int, connectivity: int,
           executor: str, scheduler: str | None, notes: list[str] | None = None) -> EvalResult:
    """Score ``predictions`` (one mask file per row of ``rows``) and write every table, the JSON and the figure."""
    from .executor import run_map
    from .metrics import CHALLENGE_WINNER, LESION_CONVENTIONS, micro_dsc, summarize

    jobs_list = [MetricJob(row["scan"], prediction, row["mask"], connectivity)
                 for row, prediction in zip(rows.to_dict("records"), predictions)]
    outcomes = run_map(score_scan, jobs_list, key=lambda j: j.scan, jobs=jobs, executor=executor, scheduler=scheduler,
                       desc="metrics", progress=progress)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("scoring failed: " + "; ".join(f"{o.key}: {o.reason}" for o in failed))
    scans = pd.DataFrame([{**rec, **o.value} for rec, o in zip(records, outcomes)])
    scans.insert(1, "size_quartile", size_quartiles(scans["volume_truth_mm3"]).to_numpy())
    scans = scans[[c for c in scans.columns if c not in file_columns] + file_columns]

    summary = summarize(scans, list(SUMMARY_METRICS), n_resamples=n_resamples, seed=seed)
    micro = micro_dsc(scans)
    tables = {"scans": _save_table(scans, out / "scans.tsv", connectivity),
              "summary": _save_table(summary, out / "summary.tsv", connectivity)}
    groups = {"size_quartile": group_table(scans, "size_quartile").rename(columns={"size_quartile": "quartile"})}
    tables["by_size_quartile"] = _save_table(groups["size_quartile"], out / "by_size_quartile.tsv", connectivity)
    for column in GROUP_COLUMNS:
        if column in scans.columns:
            groups[column] = group_table(scans, column)
            tables[f"by_{column}"] = _save_table(groups[column], out / f"by_{column}.tsv", connectivity)
    means = summary.set_index("metric")["mean"]
    doc = {
        **doc,
        "n_scans": len(scans), "micro_dsc": micro,
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": 0.95},
        "lesion_connectivity": int(connectivity),
        "lesion_convention": LESION_CONVENTIONS[connectivity],
        "hd95": "max of the two directed 95th percentiles (Metrics Reloaded, MONAI); hd95_pooled: 95th "
                "percentile of both directed sets pooled (MedPy)",
        "metrics": {r["metric"]: {k: _finite(v) for k, v in r.items() if k != "metric"}
                    for r in summary.to_dict("records")},
        "by_cohort": None if "cohort" not in groups else
        [{k: _finite(v) for k, v in r.items()} for r in groups["cohort"].to_dict("records")],
        "by_size_quartile": [{k: _finite(v) for k, v in r.items()} for r in groups["size_quartile"].to_dict("records")],
        # the winner's figures are 6-connected lesion counts: no comparison under another convention
        "challenge": None if connectivity != 6 else
        {metric: {"ours_mean": _finite(float(means.get(metric, np.nan))), "winner": value}
         for metric, value in CHALLENGE_WINNER.items()},
    }
    tables["summary_json"] = write_json(doc, out / "summary.json")
    title = (f"{title}: mean DSC {means.get('dsc', np.nan):.3f}, micro DSC {micro:.3f}, n = {len(scans)}, "
             f"{connectivity}-connected lesions")
    figure = dsc_volume_figure(scans, out / "dsc_vs_volume.png", title)
    return EvalResult(out, scans, summary, micro, tables, figure, connectivity, groups, list(notes or []))


def _check_connectivity(connectivity: int) -> int:
    from .metrics import lesion_structure

    lesion_structure(connectivity)
    return int(connectivity)


def evaluate(run_dir: os.PathLike | str, *, split: str = "test", ensemble: bool = False, jobs: int = 1,
             device: str = "auto", progress: bool = True, n_resamples: int = 1000, seed: int = 0,
             connectivity: int = 6, executor: str = "local", scheduler: str | None = None) -> EvalResult:
    """Segment and score the ``split`` scans of a training run; see the module docstring. The scans are
    segmented here; the scoring runs on ``jobs`` local worker processes, or with ``executor="dask"`` on the
    Dask cluster at ``scheduler``."""
    from tqdm.auto import tqdm

    from .postprocess import POSTPROCESS_FILE, load_choice
    from .templates import template_grid
    from .train.data import read_split
    from .train.infer import RUN_FILE, load_segmenter

    connectivity = _check_connectivity(connectivity)
    run_dir = Path(run_dir).resolve()
    if not (run_dir / RUN_FILE).is_file():
        raise io.InputError(run_dir / RUN_FILE, "not a training run folder (run.json missing)")
    run = read_json(run_dir / RUN_FILE)
    bids_root = Path(run["bids_root"])
    table = read_split(run["splits"], bids_root)
    rows = _chosen_rows(table, split, run.get("fold"), run["splits"])
    segmenter = load_segmenter(run_dir, ensemble=ensemble, device=device)
    choice = load_choice(run_dir)
    rule = choice[0] if choice is not None else None
    out = run_dir / f"eval-{split}{'-ensemble' if ensemble else ''}"
    grid = template_grid()
    rows = _with_metadata(rows, bids_root)

    predictions, records, raw_predictions, raw_records, reports = [], [], [], [], []
    for row in tqdm(rows.to_dict("records"), desc="predict", disable=not progress):
        t1_img = io.load_nifti(row["t1"])
        grid.check(t1_img, row["t1"])
        prob = segmenter.probability(np.asarray(t1_img.dataobj, dtype=np.float32))
        names = prediction_names(row["scan"], raw=rule is not None)
        paths = {k: out / "predictions" / v for k, v in names.items()}
        _, report = save_prediction(prob, segmenter.config.threshold, paths, rule)
        meta = {k: row.get(k) for k in ("scan", *META_COLUMNS) if k in row}
        predictions.append(str(paths["mask"]))
        records.append({**meta, "mask_file": paths["mask"].relative_to(out).as_posix(),
                        "probseg_file": paths["probseg"].relative_to(out).as_posix()})
        if rule is not None:
            raw_predictions.append(str(paths["mask_raw"]))
            raw_records.append({**meta, "mask_file": f"../{paths['mask_raw'].relative_to(out).as_posix()}",
                                "probseg_file": f"../{paths['probseg'].relative_to(out).as_posix()}"})
            reports.append({"scan": row["scan"], **report})
    doc = {"run": str(run_dir), "split": split, "ensemble": ensemble, "models": segmenter.sources,
           "split_file": str(run["splits"])}
    title = f"{split}{' (snapshot ensemble)' if ensemble else ''}"
    options = {"file_columns": ["mask_file", "probseg_file"], "jobs": jobs, "progress": progress,
               "n_resamples": n_resamples, "seed": seed, "connectivity": connectivity, "executor": executor,
               "scheduler": scheduler}
    raw, applied = None, None
    notes = []
    if rule is None:
        notes.append(f"no post-processing: the run has no {POSTPROCESS_FILE} (trained before post-processing was "
                     "chosen); the masks are the thresholded network output")
    else:
        record = choice[1]
        applied = {**rule.to_dict(), "description": rule.describe(), "reason": record.get("reason"),
                   "chosen_on": record.get("chosen_on"), "source": str(run_dir / POSTPROCESS_FILE)}
        raw = _score(rows, raw_predictions, raw_records, out / "raw", doc={**doc, "postprocessed": False},
                     title=f"{title}, raw masks (no post-processing)", **options)
        raw_doc = read_json(raw.tables["summary_json"])
        doc.update(postprocessing=applied,
                   raw={"output": "raw", **{key: raw_doc[key] for key in ("micro_dsc", "metrics", "challenge")}})
    doc["postprocessed"] = rule is not None
    result = _score(rows, predictions, records, out, doc=doc, title=title, notes=notes, **options)
    result.raw, result.postprocessing = raw, applied
    if raw is not None:
        result.tables["postprocess"] = _save_table(_comparison(reports, result.scans, raw.scans),
                                                   out / "postprocess.tsv", connectivity)
    refresh_index(bids_root, "run", run_dir)   # the page lists the run's eval-* folders
    return result


def _comparison(reports: list[dict], scans: pd.DataFrame, raw: pd.DataFrame) -> pd.DataFrame:
    """``postprocess.tsv``: per scan the components found and removed, and the main metrics raw and post-processed."""
    table = pd.DataFrame(reports)
    ours, theirs = scans.set_index("scan"), raw.set_index("scan")
    for metric in POSTPROCESS_METRICS:
        table[f"{metric}_raw"] = table["scan"].map(theirs[metric]).to_numpy()
        table[metric] = table["scan"].map(ours[metric]).to_numpy()
    return table


# --------------------------------------------------------------------------------------------- any model's masks

def find_bids_root(split_file: os.PathLike | str) -> Path | None:
    """The nearest folder at or above the split file's folder that holds a ``dataset_description.json`` and is
    not a derivative (not ``derivatives/`` itself nor a folder directly inside it); ``None`` when there is none.

    ``split`` writes its table to ``BIDS_ROOT/derivatives/atlas-curate/split.tsv`` by default."""
    folder = Path(split_file).resolve().parent
    for candidate in (folder, *folder.parents):
        if candidate.name == "derivatives" or candidate.parent.name == "derivatives":
            continue
        if (candidate / "dataset_description.json").is_file():
            return candidate
    return None


def _cases_at_or_above(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if (candidate / CASES_FILE).is_file():
            return candidate / CASES_FILE
    return None


def find_cases_table(predictions: os.PathLike | str) -> Path | None:
    """The ``cases.tsv`` written by ``export nnunet`` for a predictions folder: the first one in the folder or a
    folder above it; else, when nnU-Net v2's ``nnUNetv2_predict`` wrote the folder, the first one in or above its
    input folder (``list_of_lists_or_source_folder`` of its ``predict_from_raw_data_args.json``, e.g. the
    export's ``imagesTs``). ``None`` when there is none."""
    folder = Path(predictions).resolve()
    found = _cases_at_or_above(folder)
    if found is not None:
        return found
    try:
        args = read_json(folder / NNUNET_PREDICT_ARGS)
        source = args.get("list_of_lists_or_source_folder")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(source, str) and source:
        source_folder = Path(source) if Path(source).is_absolute() else folder / source
        return _cases_at_or_above(source_folder.resolve())
    return None


def read_cases(path: os.PathLike | str) -> dict[str, str]:
    """Case id → scan from an ``export nnunet`` ``cases.tsv`` (columns ``case`` and ``scan``)."""
    path = Path(path)
    if not path.is_file():
        raise io.InputError(path, "cases table not found")
    try:
        table = read_tsv(path)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise io.InputError(path, f"not a readable TSV ({exc})") from exc
    missing = [c for c in ("case", "scan") if c not in table.columns]
    if missing:
        raise io.InputError(path, f"not an export cases table: missing columns {missing}")
    duplicated = sorted(set(table.loc[table["case"].duplicated(), "case"]))
    if duplicated:
        raise io.InputError(path, f"case ids listed twice: {duplicated}")
    return dict(zip(table["case"], table["scan"]))


def _nifti_stem(name: str) -> str:
    return NIFTI.sub("", name)


def _scan_file(stem: str, ref: ScanRef | None) -> tuple[str, list[str], str] | None:
    """``(scan, middle parts, suffix)`` of a name ``sub-X[_ses-Y][_part...]_suffix`` (without extension) whose
    scan prefix is ``ref``."""
    rest = stem[len(ref.key):] if ref is not None else ""
    if not rest.startswith("_"):
        return None
    *parts, suffix = rest[1:].split("_")
    return (ref.key, parts, suffix) if all(parts) and naming.BIDS_LABEL.match(suffix) else None


def _is_raw_mask(name: str) -> bool:
    """A BIDS mask name whose ``desc-`` label ends in ``Raw`` (``desc-ResUNetRaw``, ``desc-T1lesionRaw``)."""
    parsed = naming.parse_bids_name(name)
    return parsed is not None and parsed[1] == "mask" and parsed[0].get("desc", "").endswith("Raw")


def match_predictions(folder: os.PathLike | str, scans: list[str], cases: dict[str, str] | None = None, *,
                      exclude: Path | None = None) -> tuple[dict[str, Path], pd.DataFrame, list[tuple[str, str]]]:
    """Assign the NIfTI files under ``folder`` to ``scans`` (see the module docstring for the naming rules).

    Returns ``(scan → file, report, problems)``: the report has one row per NIfTI file (``file, case, scan,
    used, reason``); ``problems`` lists ``(file or scan, reason)`` for every scan without a prediction and
    every scan with more than one. Files under ``exclude`` (the output folder) are not considered."""
    folder = Path(folder).resolve()
    wanted = set(scans)
    cases = cases or {}
    found: dict[str, list[Path]] = {}
    report = []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and NIFTI.search(p.name) and not p.name.startswith(".")
                   and not (exclude is not None and exclude in p.parents))
    for path in files:
        stem = _nifti_stem(path.name)
        case, scan, reason = None, None, ""
        ref = ScanRef.from_name(stem)
        named = _scan_file(stem, ref)
        if stem in cases:
            case, scan = stem, cases[stem]
        elif ref is not None and ref.key == stem:
            scan = stem
        elif named and named[2] == "mask":
            spaces = [part[len("space-"):] for part in named[1] if part.startswith("space-")]
            if spaces and spaces[-1] != SPACE:
                reason = f"space-{spaces[-1]}: not the {SPACE} grid of the manual masks"
            else:
                scan = named[0]
        elif named:
            reason = f"not a mask (suffix _{named[2]})"
        else:
            reason = ("name is neither a case id of the cases table nor sub-<label>[_ses-<label>][_...]_mask"
                      if cases else "name is not sub-<label>[_ses-<label>][_...]_mask and there is no cases table "
                                    "(cases.tsv) to map case ids to scans")
        if scan is not None and scan not in wanted:
            reason = f"scan {scan} is not one of the scans scored (not in this split, or without a manual mask)"
            scan_used = None
        else:
            scan_used = scan
        if scan_used is not None:
            found.setdefault(scan_used, []).append(path)
        report.append({"file": path.relative_to(folder).as_posix(), "case": case, "scan": scan,
                       "used": scan_used is not None, "reason": reason})
    rows = {row["file"]: row for row in report}
    for scan, paths in found.items():    # a raw mask beside the scan's other (post-processed) mask is not used
        raw = [path for path in paths if _is_raw_mask(path.name)]
        if raw and len(raw) < len(paths):
            found[scan] = [path for path in paths if path not in raw]
            for path in raw:
                rows[path.relative_to(folder).as_posix()].update(
                    used=False, reason="a raw mask (desc-...Raw) beside another mask of the scan, the post-processed "
                                       "one, which is used")
    problems: list[tuple[str, str]] = []
    for scan in scans:
        paths = found.get(scan, [])
        if not paths:
            expected = [f"{prediction_names(scan)['mask']}"]
            expected += [f"{c}.nii.gz" for c, s in cases.items() if s == scan]
            problems.append((scan, f"no prediction in {folder} (expected e.g. {' or '.join(expected)})"))
        elif len(paths) > 1:
            problems.append((scan, "more than one prediction: " + ", ".join(str(p) for p in paths)))
    table = pd.DataFrame(report, columns=["file", "case", "scan", "used", "reason"])
    chosen = {scan: paths[0] for scan, paths in found.items() if len(paths) == 1}
    return chosen, table, problems


def _header_problem(prediction: Path, truth: str) -> str | None:
    """Why a prediction cannot be scored against its manual mask, from the headers only (cheap)."""
    import nibabel as nib

    try:
        pred_img = nib.load(prediction)
    except Exception as exc:  # nibabel raises several types for bad files
        return f"not a readable NIfTI image ({type(exc).__name__}: {exc})"
    try:
        truth_img = nib.load(truth)
    except Exception as exc:  # noqa: BLE001
        return f"its manual mask {truth} is not a readable NIfTI image ({type(exc).__name__}: {exc})"
    shape = pred_img.shape
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        return f"expected a 3-D mask, got shape {shape}"
    problem = io.grid_difference(truth_img, pred_img)
    if problem:
        return f"not on the grid of the manual mask {truth}: {problem} (masks are never resampled)"
    return None


def evaluate_predictions(predictions: os.PathLike | str, split_file: os.PathLike | str, *, split: str = "test",
                         bids_root: os.PathLike | str | None = None, cases: os.PathLike | str | None = None,
                         output: os.PathLike | str | None = None, jobs: int = 1, progress: bool = True,
                         n_resamples: int = 1000, seed: int = 0, connectivity: int = 6, executor: str = "local",
                         scheduler: str | None = None) -> EvalResult:
    """Score a folder of predicted masks (any model's) against the manual masks of a split's ``split`` scans.

    Same metrics, summaries and tables as :func:`evaluate`; see the module docstring for how files are
    matched to scans and where the BIDS root and ``cases.tsv`` are looked for. Any scan without exactly one
    usable prediction raises :class:`~atlas_curate.io.InputError` naming every such file or scan with the
    reason (after writing ``prediction_files.tsv``); nothing is scored then. The scoring runs on ``jobs`` local
    worker processes, or with ``executor="dask"`` on the Dask cluster at ``scheduler``."""
    from .split import load_split

    connectivity = _check_connectivity(connectivity)
    folder = Path(predictions).resolve()
    if not folder.is_dir():
        raise io.InputError(folder, "predictions folder not found")
    split_file = Path(split_file)
    root = Path(bids_root).resolve() if bids_root is not None else find_bids_root(split_file)
    if bids_root is not None and not root.is_dir():
        raise io.InputError(root, "BIDS root not found")
    table = load_split(split_file, root)
    for column in ("t1", "mask"):   # as train.data.read_split resolves them
        table[column] = [None if not isinstance(v, str) or not v else v for v in table[column]]
    relative = [v for v in table["mask"].dropna() if not Path(v).is_absolute()]
    if relative:
        raise io.InputError(split_file, f"mask paths are relative to a BIDS root ({relative[0]}) and none was found "
                                        "above the split file: give the BIDS root")
    rows = _chosen_rows(table, split, None, split_file)
    cases_path = Path(cases) if cases is not None else find_cases_table(folder)
    case_map = read_cases(cases_path) if cases_path is not None else None
    out = Path(output).resolve() if output is not None else folder / f"eval-{split}"
    chosen, report, problems = match_predictions(folder, rows["scan"].tolist(), case_map, exclude=out)
    truths = dict(zip(rows["scan"], rows["mask"]))
    for scan, path in sorted(chosen.items()):
        problem = _header_problem(path, truths[scan])
        if problem:
            problems.append((str(path), problem))
            report.loc[report["file"] == path.relative_to(folder).as_posix(), ["used", "reason"]] = [False, problem]
    report_path = _save_table(report, out / "prediction_files.tsv", connectivity)
    if problems:
        shown = "; ".join(f"{what}: {why}" for what, why in problems[:20])
        more = f"; ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise io.InputError(folder, f"{len(problems)} of {len(rows)} scans of split {split!r} cannot be scored "
                                    f"(nothing was scored; every file is listed in {report_path}): {shown}{more}")

    rows = _with_metadata(rows, root)
    files = [str(chosen[scan]) for scan in rows["scan"]]
    records = [{**{k: row.get(k) for k in ("scan", *META_COLUMNS) if k in row},
                "prediction_file": chosen[row["scan"]].relative_to(folder).as_posix()}
               for row in rows.to_dict("records")]
    ignored = int((~report["used"].astype(bool)).sum())
    notes = ([f"{ignored} NIfTI file(s) in the predictions folder not used (reasons in {report_path})"]
             if ignored else [])
    doc = {"predictions": str(folder), "split": split, "split_file": str(split_file.resolve()),
           "bids_root": None if root is None else str(root),
           "cases": None if cases_path is None else str(Path(cases_path).resolve()),
           "n_files_ignored": ignored}
    result = _score(rows, files, records, out, file_columns=["prediction_file"], doc=doc,
                    title=f"{split} ({folder.name})", jobs=jobs, progress=progress, n_resamples=n_resamples,
                    seed=seed, connectivity=connectivity, executor=executor, scheduler=scheduler, notes=notes)
    refresh_index(root, "evaluation", out)   # on the page of the split's dataset, when one was found
    return result
