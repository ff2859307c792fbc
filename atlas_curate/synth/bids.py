"""Synthetic BIDS lesion datasets (``synth --flavour bids``): native-space T1s, whole head or brain-extracted,
with one lesion mask per scan, in two layouts.

* ``atlas3``: our *guess* at ATLAS v3.0, whose file names are not public. ATLAS 2.0 was BIDS-like, one
  dataset per cohort folder; v3.0 ships minimally preprocessed, brain-extracted T1s in native space. So:
  ``ATLAS_3/Training/RNNN/`` cohort folders, each a dataset (``dataset_description.json``,
  ``participants.tsv/.json``, ``README``), holding
  ``sub-rNNNsMMM/ses-1/anat/sub-rNNNsMMM_ses-1_space-orig_T1w.nii.gz`` (+ ``.json`` with ``SkullStripped``)
  and ``…_space-orig_label-L_desc-T1lesion_mask.nii.gz`` (+ ``.json``; every lesion of the scan in one mask,
  as in R2.0). Brain-extracted by default. Minimally preprocessed images with a ``space-`` entity are a BIDS
  *derivative*, so each cohort folder says ``"DatasetType": "derivative"`` (with no raw dataset linked) and
  every image's sidecar names its ``SpatialReference`` (the T1w itself: ``orig`` is its own grid). The reader
  in ``bids-convert`` must not depend on this guess.
* ``lab``: a stroke lab's own BIDS dataset: whole heads by default; subjects ``sub-01``, ``sub-02``, …, the
  odd-numbered ones session-less (``sub-01/anat/``), the even-numbered ones with two sessions (``ses-1``,
  ``ses-2``, listed in ``sub-X_sessions.tsv``); ``participants.tsv/.json``; T1w sidecars with ISLES'26-style
  fields ``DAYS_POST_STROKE``, ``CHRONICITY`` (1 when under 180 days) and ``CENTER``, plus ``SkullStripped``.
  The mask lies either beside the T1 as fMRIPrep/sMRIPrep expect it, ``sub-X[_ses-Y]_label-lesion_roi.nii.gz``
  (``masks="anat"``; listed in ``.bidsignore``), or in a derivative dataset ``derivatives/lesions_manual/``
  (``masks="derivatives"``) as ``sub-X[_ses-Y]_space-orig_desc-lesion_mask.nii.gz``, every second subject
  spelling the space ``T1w`` instead, so that both spellings occur.

The scans are the native flavour's (``release.py``): the same subjects (``make_subject``), poses
(``random_pose``), cohort grids (1 mm and 0.9 x 0.9 x 3 mm, RAS/LAS/LPS), bias, noise and lesions (up to
60 cm³), rendered by ``render.render``. Cohort k mod 4 as in the native flavour; session t of subject k uses
the native flavour's random stream for time point t. A brain-extracted T1 is the rendered head with every
voxel outside the subject's brain set to 0, as a BET-style tool leaves it: the brain mask on the scan's grid
dilated by a smoothly varying 0-2 mm (a little CSF, a slightly uneven edge), plus the lesion (a cavity is not
cut out). The random numbers of that edge come from their own stream, so the voxels kept are exactly those of
the whole-head scan with the same seed.

The truth (``<OUT>-truth``) is as for the other flavours: ``truth.json`` (per scan ``native_to_template_ras``,
the grid, the lesions, where its files are, whether it is brain-extracted), ``lesions.tsv``, the lesions on the
template grid (``masks/<scan>_space-MNI152NLin2009aSym_desc-lesions_dseg.nii.gz``) and the subject's brain on
the scan's grid before extraction (``brain_masks/<scan>_space-orig_desc-brain_mask.nii.gz``), and, with pathology
(``pathology=True``, as for the other flavours), the subject's pathology labels and ``pathology.tsv``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from .. import io, naming, tables
from ..executor import run_map, summarize
from ..templates import get_template
from .head import head_model
from .release import (
    _cohort,
    _release_order,
    _save,
    _to_dtype,
    prepare_folders,
    truth_lesions,
    truth_pathology,
    write_lesion_table,
    write_pathology_table,
)
from .render import (
    COHORTS,
    _interp_weights,
    _upsample,
    make_subject,
    native_grid,
    random_pose,
    render,
    template_dseg,
)

LAYOUTS = ("atlas3", "lab")
MASK_PLACES = ("anat", "derivatives")
ATLAS3_ROOT = Path("ATLAS_3") / "Training"
LAB_MASK_DERIVATIVE = Path("derivatives") / "lesions_manual"
BET_DILATION_MM = (0.0, 2.0)     # the brain-extraction edge: the brain mask dilated by this much (varies smoothly)
BET_EDGE_LATTICE_MM = 16.0       # spacing of the random edge field
CHRONIC_DAYS = 180               # CHRONICITY is 1 under this many days after the stroke (ISLES'26)
CENTERS = {1: "CENTER01", 2: "CENTER02", 3: "CENTER03", 4: "CENTER04"}

PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "Subject label"},
    "age": {"Description": "Age at the first scan", "Units": "year"},
    "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
    "site": {"Description": "Acquisition centre (cohort)"},
}
SESSION_COLUMNS = {
    "session_id": {"Description": "Session label"},
    "days_post_stroke": {"Description": "Days between the stroke and this scan", "Units": "day"},
}


@dataclass(frozen=True)
class BidsScanPlan:
    seed: int
    subject_index: int
    cohort: int
    sub: str
    ses: str | None
    timepoint: int           # 1, 2: which of the native flavour's random streams renders the scan
    n_lesions: int
    layout: str
    brain_extracted: bool
    masks: str
    days_post_stroke: int
    pathology: bool = False

    @property
    def scan(self) -> naming.ScanRef:
        return naming.ScanRef(self.sub, self.ses)

    @property
    def key(self) -> str:
        return self.scan.key

    @property
    def dataset(self) -> Path:
        """The dataset folder the scan belongs to, relative to the release root."""
        if self.layout == "atlas3":
            return ATLAS3_ROOT / f"R{self.cohort:03d}"
        return Path()

    @property
    def t1(self) -> Path:
        entities = {"space": naming.NATIVE_SPACE} if self.layout == "atlas3" else {}
        return self.dataset / naming.bids_path(self.sub, self.ses, "T1w", **entities)

    @property
    def mask(self) -> Path:
        if self.layout == "atlas3":
            return self.dataset / naming.bids_path(self.sub, self.ses, "mask", space=naming.NATIVE_SPACE, label="L",
                                                   desc="T1lesion")
        if self.masks == "anat":
            return naming.bids_path(self.sub, self.ses, "roi", label="lesion")
        space = naming.NATIVE_SPACE if self.subject_index % 2 == 0 else "T1w"
        return LAB_MASK_DERIVATIVE / naming.bids_path(self.sub, self.ses, "mask", space=space, desc="lesion")


def _days(rng: np.random.Generator) -> int:
    """Days after the stroke of a first scan: log-uniform 7 days to 8 years (about a third under 180 days)."""
    return int(round(np.exp(rng.uniform(np.log(7.0), np.log(3000.0)))))


def plan_bids(subjects: int, seed: int, layout: str = "atlas3", brain_extracted: bool | None = None,
              masks: str = "anat", pathology: bool = False) -> list[BidsScanPlan]:
    """The scans of a synthetic BIDS dataset (see the module docstring). ``brain_extracted=None``: brain-extracted
    for ``atlas3``, whole heads for ``lab``. ``pathology``: as for the other flavours (:mod:`.pathology`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if masks not in MASK_PLACES:
        raise ValueError(f"masks must be one of {MASK_PLACES}, not {masks!r}")
    if layout == "atlas3" and masks != "anat":
        raise ValueError("the atlas3 layout keeps its masks beside the T1 (masks='anat')")
    if subjects < 1:
        raise ValueError("need at least one subject")
    if layout == "atlas3" and subjects > len(COHORTS) * 999:
        raise ValueError(f"the atlas3 layout holds at most {len(COHORTS) * 999} subjects")
    stripped = (layout == "atlas3") if brain_extracted is None else bool(brain_extracted)
    plans = []
    for k in range(subjects):
        rng = np.random.default_rng([seed, k, 99])   # the native flavour's lesion count for subject k
        n = int(rng.choice([1, 2, 3, 4], p=[0.55, 0.2, 0.15, 0.1]))
        cohort = COHORTS[k % len(COHORTS)].number
        days = _days(np.random.default_rng([seed, k, 11]))
        if layout == "atlas3":
            sessions = [("1", 1, days)]
            sub = f"r{cohort:03d}s{k // len(COHORTS) + 1:03d}"
        else:
            sub = f"{k + 1:02d}"
            later = days + int(np.random.default_rng([seed, k, 12]).integers(150, 400))
            sessions = [(None, 1, days)] if k % 2 == 0 else [("1", 1, days), ("2", 2, later)]
        plans += [BidsScanPlan(seed, k, cohort, sub, ses, t, n, layout, stripped, masks, d, pathology)
                  for ses, t, d in sessions]
    return plans


def extract_brain(image: np.ndarray, brain: np.ndarray, zooms, rng: np.random.Generator,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with every voxel outside a BET-style brain mask set to 0, and that mask: ``brain`` dilated by a
    smoothly varying 0-2 mm (``zooms``: voxel sizes in mm), united with ``keep`` (e.g. the lesion)."""
    zooms = np.asarray(zooms, dtype=float)
    outside_mm = ndimage.distance_transform_edt(~brain, sampling=zooms)
    steps = [max(1, int(round(BET_EDGE_LATTICE_MM / z))) for z in zooms]
    coarse, weights = zip(*(_interp_weights(n, st) for n, st in zip(image.shape, steps)))
    edge = rng.uniform(*BET_DILATION_MM, size=tuple(len(c) for c in coarse)).astype(np.float32)
    mask = outside_mm <= _upsample(edge, weights)
    if keep is not None:
        mask |= keep
    return np.where(mask, image, np.zeros((), image.dtype)).astype(image.dtype), mask


def _t1_sidecar(plan: BidsScanPlan) -> dict:
    cohort = _cohort(plan.cohort)
    doc = {"MagneticFieldStrength": cohort.field_strength, "ManufacturersModelName": cohort.scanner,
           "SkullStripped": plan.brain_extracted}
    if plan.layout == "atlas3":
        doc["SpatialReference"] = f"bids::{plan.t1.relative_to(plan.dataset).as_posix()}"
    if plan.layout == "lab":
        doc.update({"DAYS_POST_STROKE": plan.days_post_stroke,
                    "CHRONICITY": int(plan.days_post_stroke < CHRONIC_DAYS),
                    "CENTER": CENTERS.get(plan.cohort, f"CENTER{plan.cohort:02d}")})
    return doc


def _mask_sidecar(plan: BidsScanPlan) -> dict | None:
    """The mask's sidecar where it is a derivative file (not for ``_label-lesion_roi`` beside a raw T1w)."""
    if plan.layout == "atlas3":
        return {"Type": "Lesion", "SpatialReference": f"bids::{plan.t1.relative_to(plan.dataset).as_posix()}"}
    if plan.masks == "derivatives":
        reference = f"bids:raw:{plan.t1.as_posix()}"
        return {"Type": "Lesion", "SpatialReference": reference, "Sources": [reference]}
    return None


def render_bids_scan(plan: BidsScanPlan, out: str, truth: str) -> dict:
    """Render one scan (T1, sidecar, lesion mask) into the dataset and its truth into the truth folder."""
    out_dir, truth_dir = Path(out), Path(truth)
    model = head_model()
    cohort = _cohort(plan.cohort)
    subject = make_subject(plan.seed, plan.subject_index, plan.n_lesions, False, model, pathology=plan.pathology)
    rng = np.random.default_rng([plan.seed, plan.subject_index, plan.timepoint])
    pose = random_pose(rng)
    shape, affine = native_grid(cohort, pose, model)
    rendered = render(subject, model, shape, affine, pose, rng, slice_thickness_mm=cohort.zooms[2], brain_mask=True)
    data = _to_dtype(rendered.image, cohort)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    voxel_mm3 = float(np.prod(zooms))
    order = _release_order([float(m.sum()) * voxel_mm3 for m in rendered.smooth_masks], False)
    raws = [rendered.raw_masks[i] for i in order]
    smooths = [rendered.smooth_masks[i] for i in order]
    subject.lesions = [subject.lesions[i] for i in order]
    union = np.logical_or.reduce(smooths) if smooths else np.zeros(shape, bool)
    kept_fraction = 1.0
    if plan.brain_extracted:
        edge_rng = np.random.default_rng([plan.seed, plan.subject_index, plan.timepoint, 31])
        data, kept = extract_brain(data, rendered.brain, zooms, edge_rng, keep=union)
        kept_fraction = float(kept.mean())

    _save(data, affine, out_dir / plan.t1)
    tables.write_json(_t1_sidecar(plan), out_dir / naming.sidecar(plan.t1))
    _save(union.astype(np.uint8), affine, out_dir / plan.mask)
    mask_doc = _mask_sidecar(plan)
    if mask_doc:
        tables.write_json(mask_doc, out_dir / naming.sidecar(plan.mask))

    template = get_template()
    dseg = template_dseg(subject)
    stem = plan.key
    io.save_nifti(nib.Nifti1Image(dseg, template.affine),
                  truth_dir / "masks" / f"{stem}_space-{template.name}_desc-lesions_dseg.nii.gz")
    pathology = truth_pathology(subject, plan.seed, plan.subject_index,
                                truth_dir / "masks" / f"{stem}_space-{template.name}")
    _save(rendered.brain.astype(np.uint8), affine,
          truth_dir / "brain_masks" / f"{stem}_space-{naming.NATIVE_SPACE}_desc-brain_mask.nii.gz")
    lesions = truth_lesions(dseg, len(subject.lesions), raws, smooths, voxel_mm3)
    return {
        "scan": plan.key,
        "plan": asdict(plan),
        "subject": plan.scan.participant_id,
        "session": plan.scan.session_id,
        "cohort": f"R{plan.cohort:03d}",
        "dataset": plan.dataset.as_posix() or ".",
        "t1w": plan.t1.as_posix(),
        "mask": plan.mask.as_posix(),
        "skull_stripped": plan.brain_extracted,
        "brain_kept_fraction": round(kept_fraction, 6),
        "native_to_template_ras": np.round(pose, 8).tolist(),
        "shape": [int(s) for s in data.shape],
        "affine": np.round(affine, 6).tolist(),
        "zooms": [float(z) for z in zooms],
        "dtype": str(data.dtype),
        "deformation": subject.params,
        "pathology": pathology,
        "lesions": lesions,
        "fault": "",
    }


def _participants(plans: list[BidsScanPlan]) -> pd.DataFrame:
    rows = {}
    for plan in plans:
        rng = np.random.default_rng([plan.seed, plan.subject_index, 5])
        rows[plan.scan.participant_id] = {"participant_id": plan.scan.participant_id,
                                          "age": int(rng.integers(28, 86)), "sex": str(rng.choice(["F", "M"])),
                                          "site": CENTERS.get(plan.cohort, f"CENTER{plan.cohort:02d}")}
    return pd.DataFrame([rows[k] for k in sorted(rows)], columns=list(PARTICIPANT_COLUMNS))


def _readme(title: str, body: str) -> str:
    return f"# {title}\n\n{body}\n"


def _write_dataset(folder: Path, plans: list[BidsScanPlan], name: str, readme: str, ignore: list[str], *,
                   dataset_type: str = "raw") -> None:
    """The dataset-level files of one BIDS dataset: description, README, participants, sessions, .bidsignore."""
    tables.write_dataset_description(folder, name, dataset_type=dataset_type, raw_link=None,
                                     description="synthetic native-space stroke T1w with lesion masks")
    io.write_text(readme, folder / "README")
    tables.write_tsv(_participants(plans), folder / "participants.tsv", integer_columns=["age"])
    tables.write_json(PARTICIPANT_COLUMNS, folder / "participants.json")
    if ignore:
        io.write_text("\n".join(ignore) + "\n", folder / ".bidsignore")
    by_subject: dict[str, list[BidsScanPlan]] = {}
    for plan in plans:
        by_subject.setdefault(plan.sub, []).append(plan)
    with_sessions = False
    for sub, scans in sorted(by_subject.items()):
        if scans[0].ses is None or len(scans) < 2:
            continue
        with_sessions = True
        frame = pd.DataFrame([{"session_id": p.scan.session_id, "days_post_stroke": p.days_post_stroke}
                              for p in sorted(scans, key=lambda p: p.timepoint)])
        tables.write_tsv(frame, folder / naming.sessions_table(sub), integer_columns=["days_post_stroke"])
    if with_sessions:
        tables.write_json(SESSION_COLUMNS, folder / "sessions.json")


def write_dataset_files(plans: list[BidsScanPlan], out_dir: Path) -> list[Path]:
    """Every dataset's own files (one dataset per cohort folder for ``atlas3``); returns the dataset folders."""
    layout = plans[0].layout
    if layout == "atlas3":
        folders = []
        for cohort in sorted({p.cohort for p in plans}):
            members = [p for p in plans if p.cohort == cohort]
            folder = out_dir / members[0].dataset
            cohort_id = f"R{cohort:03d}"
            readme = _readme(f"ATLAS v3.0-like cohort {cohort_id} (synthetic)",
                             "A synthetic guess at one cohort of the ATLAS v3.0 training set: minimally "
                             "preprocessed native-space T1w (space-orig) and one lesion mask per scan, "
                             "label-L_desc-T1lesion_mask. The real release's file names are not public; this "
                             "layout is a guess.")
            _write_dataset(folder, members, f"ATLAS v3.0-like {cohort_id} (synthetic)", readme, [],
                           dataset_type="derivative")
            folders.append(folder)
        return folders
    masks = plans[0].masks
    readme = _readme("Synthetic stroke cohort (atlas-curate)",
                     "A synthetic lab dataset: native T1w, some subjects with two sessions, some without sessions; "
                     "T1w sidecars carry DAYS_POST_STROKE, CHRONICITY and CENTER. Lesion masks are "
                     + ("beside each T1w as _label-lesion_roi (listed in .bidsignore)." if masks == "anat"
                        else "in derivatives/lesions_manual/."))
    _write_dataset(out_dir, plans, "Synthetic stroke cohort", readme,
                   ["**/*_label-lesion_roi.nii.gz"] if masks == "anat" else [])
    if masks == "derivatives":
        tables.write_dataset_description(out_dir / LAB_MASK_DERIVATIVE, "Manual lesion masks (synthetic)",
                                         description="lesion masks traced on the native T1w")
    return [out_dir]


def synthesize_bids(out: os.PathLike | str, *, subjects: int = 4, seed: int = 0, layout: str = "atlas3",
                    brain_extracted: bool | None = None, masks: str = "anat", truth: os.PathLike | str | None = None,
                    jobs: int = 1, progress: bool = True, pathology: bool = False) -> dict:
    """Write a synthetic BIDS lesion dataset to ``out`` and its truth to ``truth`` (default ``<out>-truth``).
    Returns the truth dictionary; the output is a pure function of the arguments other than ``out``, ``truth``,
    ``jobs`` and ``progress``."""
    plans = plan_bids(subjects, seed, layout, brain_extracted, masks, pathology)
    out_dir, truth_dir = prepare_folders(out, truth)
    outcomes = run_map(partial(render_bids_scan, out=str(out_dir), truth=str(truth_dir)), plans,
                       key=lambda p: p.key, jobs=jobs, desc="synth", progress=progress)
    if any(not o.ok for o in outcomes):
        raise RuntimeError("synthesis failed:\n" + summarize(outcomes))
    records = [o.value for o in outcomes]
    datasets = write_dataset_files(plans, out_dir)
    doc = {
        "generator": "atlas-curate synth",
        "flavour": "bids",
        "layout": layout,
        "masks": masks,
        "skull_stripped": plans[0].brain_extracted,
        "seed": seed,
        "subjects": subjects,
        "pathology": pathology,
        "template": get_template().name,
        "release": str(out_dir),
        "datasets": [d.relative_to(out_dir).as_posix() or "." for d in datasets],
        "transform_convention": "native_to_template_ras maps native world RAS mm to template world RAS mm",
        "faults": {},
        "scans": {r["scan"]: r for r in records},
    }
    tables.write_json(doc, truth_dir / "truth.json")
    write_lesion_table(records, truth_dir)
    write_pathology_table(records, truth_dir)
    return doc
