"""``predict``: segment new T1w images with a trained run, one lesion mask (and probability map) per input.

Two kinds of input:

* template space (default): the image must already be on the MNI152NLin2009aSym 1 mm grid (197 × 233 × 189,
  e.g. an ATLAS R2.0 or R1.1-standard T1w, or ``normalize`` output); the grid is verified (shape and affine
  within 1e-3 mm, else an error suggesting ``--native``) and registration is skipped;
* ``native``: a scanner-space whole-head T1w goes through the registration of ``normalize``
  (:func:`atlas_curate.normalize.register.register`: N4, brain-aware affine) and is resampled onto the
  template grid (linear), exactly as ``normalize`` does.

Either way the intensities are then standardised as ``normalize`` does: the white-matter peak
(:func:`~atlas_curate.normalize.pipeline.wm_peak`) of the voxels inside the template brain is mapped to
:data:`~atlas_curate.normalize.pipeline.WM_TARGET` (100). (``normalize`` leaves the manual lesion out of the
peak; no manual lesion exists here, and the peak is the mode of the brighter half of the brain, which a
lesion hardly moves.) Defacing is not needed: the network sees only the brain's bounding box.

The run's model (or snapshot ensemble) gives lesion probabilities on the template grid, thresholded at the
run's ``threshold`` (0.5). For native inputs both are taken back to the input's own grid with the inverse
of the affine (the ANTs ``.mat`` maps template points to native points, so resampling template → native
applies it inverted): nearest neighbour for the mask, linear for the probabilities. Outputs keep the
input's affine.

Names: an input named like BIDS (``sub-X[_ses-Y][_...]_T1w.nii[.gz]``) inside a BIDS dataset (a
``dataset_description.json`` in a parent folder) gives BIDS-derivative outputs
``OUTPUT/sub-X/ses-Y/anat/sub-X_ses-Y_space-<S>_label-L_desc-ResUNet_mask.nii.gz`` and ``..._probseg.nii.gz``
with JSON sidecars (``S`` is ``orig`` for native inputs, as bids-convert names native masks, else
``MNI152NLin2009aSym``) and a ``dataset_description.json``; any other input gives
``OUTPUT/<input name without .nii[.gz]>_label-L_desc-ResUNet_mask.nii.gz`` (and ``_probseg``). A table
``predictions.tsv`` lists every input with its outputs, the lesion volume (mm³) and, on failure, the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import __version__, io, naming
from .index import refresh_index, run_bids_root

SPACE = "MNI152NLin2009aSym"
DESC = "ResUNet"
BIDS_T1 = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*"
                     r"_T1w\.nii(?:\.gz)?$")
COLUMNS = ["input", "status", "space", "mask", "probseg", "lesion_volume_mm3", "wm_peak", "seconds", "error"]


@dataclass
class PredictResult:
    output: Path
    table: pd.DataFrame

    @property
    def n_failed(self) -> int:
        return int((self.table["status"] != "ok").sum())


def _bids_root(path: Path) -> Path | None:
    for parent in path.resolve().parents:
        if (parent / "dataset_description.json").is_file():
            return parent
    return None


def output_names(t1: os.PathLike | str, *, native: bool) -> dict[str, Path]:
    """Relative output paths (``mask``, ``probseg``) for one input; see the module docstring."""
    t1 = Path(t1)
    space = "orig" if native else SPACE
    match = BIDS_T1.match(t1.name)
    if match and _bids_root(t1) is not None:
        sub, ses = match["sub"], match["ses"]
        return {kind: naming.bids_path(sub, ses, kind, space=space, label="L", desc=DESC)
                for kind in ("mask", "probseg")}
    stem = re.sub(r"\.nii(\.gz)?$", "", t1.name)
    return {kind: Path(f"{stem}_label-L_desc-{DESC}_{kind}.nii.gz") for kind in ("mask", "probseg")}


def standardise(image: np.ndarray) -> tuple[np.ndarray, float]:
    """``normalize``'s intensity scale (white-matter peak inside the template brain → 100, negatives → 0)."""
    from .normalize.pipeline import standardise as scale
    from .templates import template_arrays

    return scale(image, template_arrays()["T1w"] > 0)


def _on_template(t1_img, path: Path, segmenter) -> tuple[np.ndarray, np.ndarray, float]:
    from .train.data import nib_template

    problem = io.grid_difference(nib_template(), t1_img)
    if problem:
        raise io.InputError(path, f"not on the {SPACE} 1 mm grid ({problem}); use --native for a T1w in "
                                  "scanner space")
    standard, peak = standardise(np.asarray(t1_img.dataobj, dtype=np.float32))
    prob = segmenter.probability(standard)
    return prob >= segmenter.config.threshold, prob, peak


def _native(t1_img, path: Path, segmenter) -> tuple[np.ndarray, np.ndarray, float]:
    """Register, resample and standardise as ``normalize`` does, segment, and map back to the input grid."""
    import ants

    from .normalize.register import register, template_images, to_ants

    workdir = tempfile.mkdtemp(prefix="atlas-curate-predict-")
    try:
        try:
            reg = register(t1_img, None, workdir=workdir)
        except RuntimeError as exc:
            raise io.InputError(path, f"registration to {SPACE} failed: {exc}") from exc
        fixed = template_images()["t1"]
        moved = ants.apply_transforms(fixed, reg.corrected, [reg.transform_file], interpolator="linear").numpy()
        standard, peak = standardise(moved)
        prob = segmenter.probability(standard)
        mask = (prob >= segmenter.config.threshold).astype(np.float32)
        native = to_ants(t1_img)

        def back(data: np.ndarray, interpolator: str) -> np.ndarray:
            moving = fixed.new_image_like(np.asarray(data, dtype=np.float32))
            return ants.apply_transforms(native, moving, [reg.transform_file], whichtoinvert=[True],
                                         interpolator=interpolator).numpy()

        return back(mask, "nearestNeighbor") > 0.5, np.clip(back(prob, "linear"), 0.0, 1.0), peak
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _sidecar(path: Path, source: Path, run_dir: Path, segmenter, native: bool, kind: str) -> None:
    root = _bids_root(source)
    src = f"bids:raw:{source.resolve().relative_to(root).as_posix()}" if root else str(source.resolve())
    doc = {"Sources": [src], "Type": "Lesion",
           "Description": ("binary lesion mask (probability >= %g)" % segmenter.config.threshold if kind == "mask"
                           else "lesion probability"),
           "Model": {"Name": "3D ResU-Net (Tomita et al. 2020)", "Run": str(run_dir),
                     "Weights": [Path(s).name for s in segmenter.sources]},
           "SpatialReference": "orig" if native else SPACE}
    io.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", naming.sidecar(path))


def _dataset_description(output: Path) -> None:
    doc = {"Name": "atlas-curate predict", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "atlas-curate", "Version": __version__,
                            "Description": "lesion segmentation with the 3D ResU-Net baseline"}]}
    io.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", output / "dataset_description.json")


def predict(run_dir: os.PathLike | str, t1s: Sequence[os.PathLike | str], output: os.PathLike | str, *,
            native: bool = False, ensemble: bool = False, device: str = "auto", progress: bool = True
            ) -> PredictResult:
    """Segment each T1w of ``t1s`` with the run's model; see the module docstring.

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
    rows = []
    any_bids = False
    for t1, name in tqdm(list(zip(inputs, names)), desc="predict", disable=not progress):
        start = time.perf_counter()
        row = {"input": str(t1), "space": "orig" if native else SPACE}
        try:
            img = io.load_nifti(t1)
            mask, prob, peak = (_native if native else _on_template)(img, t1, segmenter)
            paths = {k: output / v for k, v in name.items()}
            io.save_array(mask, img.affine, paths["mask"], np.uint8)
            io.save_array(prob, img.affine, paths["probseg"], np.float32)
            for kind, path in paths.items():
                _sidecar(path, t1, run_dir, segmenter, native, kind)
            any_bids = any_bids or len(name["mask"].parts) > 1
            row.update({"status": "ok", "mask": name["mask"].as_posix(), "probseg": name["probseg"].as_posix(),
                        "lesion_volume_mm3": float(np.count_nonzero(mask)) * io.voxel_volume(img),
                        "wm_peak": peak, "error": ""})
        except io.InputError as exc:
            row.update({"status": "failed", "error": str(exc)})
        except ValueError as exc:   # e.g. no brain intensities to standardise
            row.update({"status": "failed", "error": f"{t1}: {exc}"})
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
    output.mkdir(parents=True, exist_ok=True)
    if any_bids:
        _dataset_description(output)
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    io.write_text(table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"),
                  output / "predictions.tsv")
    refresh_index(run_bids_root(run_dir), "predictions", output)   # the page of the run's dataset
    return PredictResult(output, table)
