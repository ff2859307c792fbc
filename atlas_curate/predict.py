"""``predict``: segment new T1w images with a trained run, one lesion mask (and probability map) per input.

Two kinds of input:

* template space (default): the image must already be on the template's 1 mm grid (197 × 233 × 189,
  e.g. an ATLAS R2.0 or R1.1-standard T1w, or ``normalize`` output); the grid is verified (shape and affine
  within 1e-3 mm, else an error suggesting ``--native``) and registration is skipped;
* ``native``: a scanner-space whole-head T1w goes through the registration of ``normalize``
  (:func:`atlas_curate.normalize.register.register`: N4, brain-aware affine) and is resampled onto the
  template grid (linear), exactly as ``normalize`` does.

Either way the intensities are then standardised as ``normalize`` does: the white-matter peak
(:func:`~atlas_curate.normalize.register.wm_peak`) of the voxels inside the template brain is mapped to
:data:`~atlas_curate.normalize.pipeline.WM_TARGET` (100). (``normalize`` leaves the manual lesion out of the
peak; no manual lesion exists here, and the peak is the mode of the brighter half of the brain, which a
lesion hardly moves.) Defacing is not needed: the network sees only the brain's bounding box.

The run's model (or snapshot ensemble) gives lesion probabilities on the template grid, thresholded at the
run's ``threshold`` (0.5): the *raw* mask. The run's post-processing (``RUN_DIR/postprocess.json``, chosen on
its dev scans when training completed; :mod:`atlas_curate.postprocess`) is then applied on the template grid:
6-connected components outside the (dilated) template brain and those smaller than the chosen minimum size are
removed (with ``--ensemble`` too: the rule was chosen for ``model.pt``). That is the mask written as
``prediction_mask``; the raw mask is written beside it as ``prediction_mask_raw``. With ``postprocess=False``
(``--no-postprocess``), or for a run without ``postprocess.json`` (trained by an older version),
``prediction_mask`` is the raw mask and no ``prediction_mask_raw`` is written; the table and the sidecars say
which. For native inputs the masks and the probabilities are taken back to the input's own grid with the
inverse of the affine (the ANTs ``.mat`` maps template points to native points, so resampling template →
native applies it inverted): nearest neighbour for the masks, linear for the probabilities. Outputs
keep the input's affine.

Names: an input named like BIDS (``sub-X[_ses-Y][_...]_T1w.nii[.gz]``) inside a BIDS dataset (a
``dataset_description.json`` in a parent folder) gives BIDS-derivative outputs named by the naming spec
(``prediction_mask``, ``prediction_mask_raw``, ``prediction_probseg``):
``OUTPUT/sub-X/[ses-Y/]anat/sub-X[_ses-Y]_space-<S>_label-L_desc-ResUNet_mask.nii.gz``,
``..._desc-ResUNetRaw_mask.nii.gz`` and ``..._desc-ResUNet_probseg.nii.gz`` with JSON sidecars (``S`` is
``orig`` for native inputs, as bids-convert names native masks, else the template space) and a
``dataset_description.json``; any other input gives
``OUTPUT/<input name without .nii[.gz]>_label-L_desc-ResUNet_mask.nii.gz`` (and ``_desc-ResUNetRaw_mask``,
``_desc-ResUNet_probseg``). A table ``predictions.tsv`` lists every input with its outputs (``mask``,
``mask_raw``, ``probseg``), the lesion volume (mm³) of the mask and of the raw mask, the components the
post-processing removed, the post-processing applied (``postprocessing``) and, on failure, the reason.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import io, naming, tables
from .index import refresh_index, run_bids_root

SPACE = naming.SPACE
OUTPUTS = {"mask": "prediction_mask", "mask_raw": "prediction_mask_raw",
           "probseg": "prediction_probseg"}   # table column -> naming-spec key
COLUMNS = ["input", "status", "space", "mask", "mask_raw", "probseg", "lesion_volume_mm3", "lesion_volume_raw_mm3",
           "components_removed", "postprocessing", "wm_peak", "seconds", "error"]


@dataclass
class PredictResult:
    output: Path
    table: pd.DataFrame
    postprocessing: str = "none"         # what was applied (the rule, or none and why)

    @property
    def n_failed(self) -> int:
        return int((self.table["status"] != "ok").sum())


def _bids_root(path: Path) -> Path | None:
    for parent in path.resolve().parents:
        if (parent / "dataset_description.json").is_file():
            return parent
    return None


def _bids_scan(t1: Path) -> naming.ScanRef | None:
    """The scan of a BIDS-named T1w (``sub-X[_ses-Y][_...]_T1w.nii[.gz]``) inside a BIDS dataset, else None."""
    parsed = naming.parse_bids_name(t1.name)
    if parsed is None or parsed[1] != "T1w" or parsed[2] not in (".nii", ".nii.gz") or _bids_root(t1) is None:
        return None
    return naming.ScanRef.from_name(t1.name)


def _loose_name(stem: str, output: str) -> Path:
    """``<stem>_<entities but space>_<suffix><ext>`` of the spec's ``output``, for an input outside BIDS."""
    entry = naming.output_spec(output)
    entities = "".join(f"_{key}-{value}" for key, value in entry["entities"].items() if key != "space")
    return Path(f"{stem}{entities}_{entry['suffix']}{entry.get('extension', '.nii.gz')}")


def output_names(t1: os.PathLike | str, *, native: bool) -> dict[str, Path]:
    """Relative output paths (``mask``, ``mask_raw``, ``probseg``) for one input; see the module docstring."""
    t1 = Path(t1)
    scan = _bids_scan(t1)
    if scan is not None:
        space = naming.NATIVE_SPACE if native else SPACE
        return {column: scan.path(output, space=space) for column, output in OUTPUTS.items()}
    stem = next((t1.name[: -len(ext)] for ext in (".nii.gz", ".nii") if t1.name.endswith(ext)), t1.name)
    return {column: _loose_name(stem, output) for column, output in OUTPUTS.items()}


def standardise(image: np.ndarray) -> tuple[np.ndarray, float]:
    """``normalize``'s intensity scale (white-matter peak inside the template brain → 100, negatives → 0)."""
    from .normalize.pipeline import standardise as scale
    from .templates import template_grid

    return scale(image, template_grid().brain)


def _masks(prob: np.ndarray, segmenter, rule) -> tuple[dict[str, np.ndarray | None], dict | None]:
    """The mask (post-processed with ``rule`` when there is one), the raw mask (None without ``rule``) and the
    probabilities, on the template grid; and the post-processing report."""
    from .postprocess import postprocess

    raw = prob >= segmenter.config.threshold
    if rule is None:
        return {"mask": raw, "mask_raw": None, "probseg": prob}, None
    cleaned, report = postprocess(raw, rule)
    return {"mask": cleaned, "mask_raw": raw, "probseg": prob}, report


def _on_template(t1_img, path: Path, segmenter, rule) -> tuple[dict, dict | None, float]:
    from .templates import template_grid

    template_grid().check(t1_img, path, hint="; use --native for a T1w in scanner space")
    standard, peak = standardise(np.asarray(t1_img.dataobj, dtype=np.float32))
    arrays, report = _masks(segmenter.probability(standard), segmenter, rule)
    return arrays, report, peak


def _native(t1_img, path: Path, segmenter, rule) -> tuple[dict, dict | None, float]:
    """Register, resample and standardise as ``normalize`` does, segment and post-process on the template grid,
    and map back to the input grid."""
    import ants

    from .normalize.pipeline import to_template
    from .normalize.register import register, template_images, to_ants

    with tempfile.TemporaryDirectory(prefix="atlas-curate-predict-", ignore_cleanup_errors=True) as workdir:
        try:
            reg = register(t1_img, None, workdir=workdir)
        except RuntimeError as exc:
            raise io.InputError(path, f"registration to {SPACE} failed: {exc}") from exc
        standard, _, peak = to_template(reg.corrected, reg.transform_file)
        arrays, report = _masks(segmenter.probability(standard), segmenter, rule)
        fixed, native = template_images()["t1"], to_ants(t1_img)

        def back(data: np.ndarray, interpolator: str) -> np.ndarray:
            moving = fixed.new_image_like(np.asarray(data, dtype=np.float32))
            return ants.apply_transforms(native, moving, [reg.transform_file], whichtoinvert=[True],
                                         interpolator=interpolator).numpy()

        mapped = {column: None if data is None else back(data.astype(np.float32), "nearestNeighbor") > 0.5
                  for column, data in arrays.items() if column != "probseg"}
        mapped["probseg"] = np.clip(back(arrays["probseg"], "linear"), 0.0, 1.0)
        return mapped, report, peak


def _sidecar_fields(column: str, source: Path, run_dir: Path, segmenter, space: str, rule) -> dict:
    root = _bids_root(source)
    src = f"bids:raw:{source.resolve().relative_to(root).as_posix()}" if root else str(source.resolve())
    mask = "binary lesion mask (probability >= %g)" % segmenter.config.threshold
    description = {"mask": mask if rule is None else f"{mask}, post-processed: {rule.describe()}",
                   "mask_raw": f"{mask}, before post-processing",
                   "probseg": "lesion probability"}[column]
    fields = {"Sources": [src], "Type": "Lesion", "Description": description,
              "Model": {"Name": "3D ResU-Net (Tomita et al. 2020)", "Run": str(run_dir),
                        "Weights": [Path(s).name for s in segmenter.sources]},
              "SpatialReference": space}
    if column == "mask" and rule is not None:
        from .postprocess import POSTPROCESS_FILE

        fields["PostProcessing"] = {**rule.to_dict(), "Source": str(run_dir / POSTPROCESS_FILE)}
    return fields


def _rule(run_dir: Path, postprocess: bool):
    """The run's post-processing rule (or None) and what the table says about it."""
    from .postprocess import POSTPROCESS_FILE, load_choice

    if not postprocess:
        return None, "none (--no-postprocess)"
    choice = load_choice(run_dir)
    if choice is None:
        return None, f"none (the run has no {POSTPROCESS_FILE}: trained before post-processing was chosen)"
    return choice[0], choice[0].describe()


def predict(run_dir: os.PathLike | str, t1s: Sequence[os.PathLike | str], output: os.PathLike | str, *,
            native: bool = False, ensemble: bool = False, device: str = "auto", progress: bool = True,
            postprocess: bool = True) -> PredictResult:
    """Segment each T1w of ``t1s`` with the run's model; see the module docstring.

    ``postprocess`` applies the run's post-processing (``postprocess.json``) and also writes the raw mask.
    A bad input (unreadable, not on the template grid without ``native``, failed registration) is reported
    in the table (``status = failed``, ``error``) and the others go on.
    """
    from tqdm.auto import tqdm

    from .train.infer import load_segmenter

    if not t1s:
        raise ValueError("no input T1w images given")
    run_dir = Path(run_dir).resolve()
    output = Path(output).resolve()
    inputs = [Path(t) for t in t1s]
    names = [output_names(t, native=native) for t in inputs]
    seen: dict[Path, Path] = {}
    for t1, name in zip(inputs, names):
        if name["mask"] in seen:
            raise ValueError(f"{t1} and {seen[name['mask']]} would both be written to {output / name['mask']}")
        seen[name["mask"]] = t1
        for path in name.values():
            if (output / path).resolve() == t1.resolve():
                raise ValueError(f"{t1}: the output would overwrite the input")
    segmenter = load_segmenter(run_dir, ensemble=ensemble, device=device)
    rule, applied = _rule(run_dir, postprocess)
    space = naming.NATIVE_SPACE if native else SPACE
    rows = []
    any_bids = False
    for t1, name in tqdm(list(zip(inputs, names)), desc="predict", disable=not progress):
        start = time.perf_counter()
        row = {"input": str(t1), "space": space, "postprocessing": applied}
        try:
            img = io.load_nifti(t1)
            arrays, report, peak = (_native if native else _on_template)(img, t1, segmenter, rule)
            for column, data in arrays.items():
                if data is None:
                    continue
                path = output / name[column]
                io.save_array(data, img.affine, path, naming.output_spec(OUTPUTS[column])["dtype"])
                fields = _sidecar_fields(column, t1, run_dir, segmenter, space, rule)
                tables.write_json(naming.output_sidecar(OUTPUTS[column], space=space, **fields), naming.sidecar(path))
                row[column] = name[column].as_posix()
            any_bids = any_bids or len(name["mask"].parts) > 1
            raw = arrays["mask"] if arrays["mask_raw"] is None else arrays["mask_raw"]
            row.update({"status": "ok", "wm_peak": peak, "error": "",
                        "lesion_volume_mm3": float(np.count_nonzero(arrays["mask"])) * io.voxel_volume(img),
                        "lesion_volume_raw_mm3": float(np.count_nonzero(raw)) * io.voxel_volume(img),
                        "components_removed": None if report is None else
                        report["removed_small"] + report["removed_outside_brain"]})
        except io.InputError as exc:
            row.update({"status": "failed", "error": str(exc)})
        except ValueError as exc:   # e.g. no brain intensities to standardise
            row.update({"status": "failed", "error": f"{t1}: {exc}"})
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
    output.mkdir(parents=True, exist_ok=True)
    if any_bids:
        tables.write_dataset_description(output, "atlas-curate predict", raw_link=None,
                                         description="lesion segmentation with the 3D ResU-Net baseline")
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    tables.write_tsv(table, output / "predictions.tsv", float_format="%.6g")
    refresh_index(run_bids_root(run_dir), "predictions", output)   # the page of the run's dataset
    return PredictResult(output, table, applied)
