"""predict: template-space and native inputs, intensity standardisation, names, per-input failures."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import ndimage

torch = pytest.importorskip("torch")

from test_train import MICRO, write_toy_dataset  # noqa: E402  (tests/ is on sys.path under pytest)

from atlas_curate import io  # noqa: E402
from atlas_curate.cli import main  # noqa: E402
from atlas_curate.postprocess import PostProcessing, load_choice, postprocess, save_choice  # noqa: E402
from atlas_curate.predict import output_names, predict, standardise  # noqa: E402
from atlas_curate.templates import get_template, template_arrays  # noqa: E402
from atlas_curate.train import train  # noqa: E402
from atlas_curate.train.infer import Segmenter  # noqa: E402

SPACE = "MNI152NLin2009aSym"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    table = write_toy_dataset(base / "bids", n_scans=6)
    train(base / "bids", base / "bids" / "splits.tsv", base / "run", config=MICRO, device="cpu", progress=False)
    return base / "run", table


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_output_names(tmp_path):
    bids = tmp_path / "ds"
    anat = bids / "sub-01" / "ses-2" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text("{}")
    names = output_names(anat / "sub-01_ses-2_T1w.nii.gz", native=True)
    assert names["mask"].as_posix() == "sub-01/ses-2/anat/sub-01_ses-2_space-orig_label-L_desc-ResUNet_mask.nii.gz"
    names = output_names(anat / "sub-01_ses-2_space-MNI152NLin2009aSym_T1w.nii.gz", native=False)
    assert names["probseg"].name == f"sub-01_ses-2_space-{SPACE}_label-L_desc-ResUNet_probseg.nii.gz"
    loose = output_names(tmp_path / "patient 7.nii", native=False)        # not in a BIDS dataset
    assert loose["mask"].as_posix() == "patient 7_label-L_desc-ResUNet_mask.nii.gz"


def test_output_names_without_session_and_of_other_bids_files(tmp_path):
    bids = tmp_path / "ds"
    anat = bids / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text("{}")
    names = output_names(anat / "sub-01_acq-mprage_T1w.nii", native=True)
    assert names["mask"].as_posix() == "sub-01/anat/sub-01_space-orig_label-L_desc-ResUNet_mask.nii.gz"
    assert names["probseg"].as_posix() == "sub-01/anat/sub-01_space-orig_label-L_desc-ResUNet_probseg.nii.gz"
    other = output_names(anat / "sub-01_FLAIR.nii.gz", native=False)      # a BIDS name, but not a T1w
    assert other["probseg"].as_posix() == "sub-01_FLAIR_label-L_desc-ResUNet_probseg.nii.gz"


def test_standardise_maps_white_matter_to_100():
    brain = template_arrays()["T1w"]
    image = brain * 300.0 + 7.0 * (brain > 0)
    standard, peak = standardise(image)
    again, peak3 = standardise(image * 3)
    assert peak3 == pytest.approx(3 * peak, rel=1e-5)
    assert np.allclose(standard, again, atol=1e-3)
    wm = template_arrays()["WM"] > 0.9
    assert 80 < np.median(standard[wm]) < 130  # the peak (100) is the mode of the brighter half, not the WM median


def test_template_space_inputs(run, tmp_path):
    run_dir, table = run
    row = table[table["split"] == "test"].iloc[0]
    loose = tmp_path / "in" / "brighter.nii.gz"                          # the same scan, 3 × brighter, no BIDS
    img = nib.load(row["t1"])
    io.save_nifti(nib.Nifti1Image(np.asarray(img.dataobj) * 3.0, img.affine), loose)
    shifted = tmp_path / "in" / "shifted.nii.gz"                          # not on the template grid
    moved = img.affine.copy()
    moved[0, 3] += 5
    io.save_nifti(nib.Nifti1Image(np.asarray(img.dataobj), moved), shifted)
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"\0" * 4000)[:60])
    out = tmp_path / "out"
    result = predict(run_dir, [row["t1"], loose, shifted, broken], out, device="cpu", progress=False)
    table_out = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert table_out["status"].tolist() == ["ok", "ok", "failed", "failed"] and result.n_failed == 2
    assert "use --native" in table_out.loc[2, "error"] and "shifted.nii.gz" in table_out.loc[2, "error"]
    assert "broken.nii.gz" in table_out.loc[3, "error"]
    bids_mask = out / table_out.loc[0, "mask"]
    assert bids_mask.relative_to(out).as_posix() == (
        f"{row['scan'].replace('_', '/')}/anat/{row['scan']}_space-{SPACE}_label-L_desc-ResUNet_mask.nii.gz")
    assert (out / "dataset_description.json").is_file()
    sidecar = json.loads(bids_mask.with_name(bids_mask.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Sources"][0].startswith("bids:raw:derivatives/atlas-curate/")
    assert (out / "brighter_label-L_desc-ResUNet_mask.nii.gz").is_file()
    first = nib.load(bids_mask)
    assert io.grid_difference(nib.load(get_template().t1w), first) is None
    prob_a = np.asarray(nib.load(out / table_out.loc[0, "probseg"]).dataobj)
    prob_b = np.asarray(nib.load(out / table_out.loc[1, "probseg"]).dataobj)
    assert np.allclose(prob_a, prob_b, atol=1e-3)      # standardisation removes the global intensity scale
    mask = np.asarray(first.dataobj)
    raw = np.asarray(nib.load(out / table_out.loc[0, "mask_raw"]).dataobj)
    assert "desc-ResUNetRaw_mask" in table_out.loc[0, "mask_raw"]
    # the raw mask is the thresholded probability; the mask is the raw one post-processed with the run's rule
    assert set(np.unique(mask)) <= {0, 1} and np.array_equal(raw > 0, prob_a >= 0.5)
    assert np.array_equal(mask > 0, postprocess(raw > 0, load_choice(run_dir)[0])[0])
    assert table_out.loc[0, "lesion_volume_mm3"] == np.count_nonzero(mask)
    assert table_out.loc[0, "lesion_volume_raw_mm3"] == np.count_nonzero(raw)
    with pytest.raises(ValueError, match="would both be written"):
        predict(run_dir, [loose, loose], tmp_path / "again", device="cpu", progress=False)


def _copy_run(run_dir, dest):
    """The files predict reads (configuration, run record, model, post-processing), not the checkpoints."""
    dest.mkdir()
    for name in ("config.toml", "run.json", "model.pt", "postprocess.json"):
        shutil.copy(run_dir / name, dest / name)
    return dest


def test_predict_applies_the_runs_postprocessing(run, tmp_path, monkeypatch):
    """With the network replaced by a lesion, a 3-voxel speck in the brain and a block in the air: the mask keeps
    the lesion (the run's rule: < 20 mm³ and outside the brain removed), the raw mask keeps everything, the table
    and sidecars say what was done; --no-postprocess and a run without postprocess.json write the raw mask."""
    run_dir, table = _copy_run(run[0], tmp_path / "run"), run[1]
    record = json.loads((run_dir / "postprocess.json").read_text())
    save_choice({**record, "postprocessing": PostProcessing(min_size_mm3=20).to_dict()}, run_dir)
    row = table[table["split"] == "test"].iloc[0]
    lesion = np.asarray(nib.load(row["mask"]).dataobj) > 0
    speck = np.zeros_like(lesion)
    speck[98, 150, 100:103] = True                               # in the brain, far from the lesion
    air = np.zeros_like(lesion)
    air[2:7, 2:7, 2:6] = True
    assert not (ndimage.binary_dilation(speck) & lesion).any() and template_arrays()["T1w"][98, 150, 100:103].min() > 0
    prob = np.where(lesion, 0.9, 0.0) + np.where(speck, 0.8, 0.0) + np.where(air, 0.7, 0.0)
    monkeypatch.setattr(Segmenter, "probability", lambda self, image: prob.astype(np.float32))

    result = predict(run_dir, [row["t1"]], tmp_path / "out", device="cpu", progress=False)
    out = result.table.iloc[0]
    assert out["status"] == "ok" and out["postprocessing"] == result.postprocessing
    assert "smaller than 20 mm³" in result.postprocessing
    mask = np.asarray(nib.load(tmp_path / "out" / out["mask"]).dataobj) > 0
    raw = np.asarray(nib.load(tmp_path / "out" / out["mask_raw"]).dataobj) > 0
    assert np.array_equal(mask, lesion) and np.array_equal(raw, lesion | speck | air)
    assert out["components_removed"] == 2 and out["lesion_volume_mm3"] == lesion.sum()
    assert out["lesion_volume_raw_mm3"] - out["lesion_volume_mm3"] == 3 + 100
    sidecar = json.loads((tmp_path / "out" / out["mask"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["PostProcessing"]["min_size_mm3"] == 20 and "post-processed" in sidecar["Description"]
    raw_sidecar = json.loads((tmp_path / "out" / out["mask_raw"].replace(".nii.gz", ".json")).read_text())
    assert "before post-processing" in raw_sidecar["Description"] and "PostProcessing" not in raw_sidecar
    written = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert written.loc[0, "components_removed"] == 2 and written.loc[0, "mask_raw"] == out["mask_raw"]

    cli = CliRunner().invoke(main, ["predict", str(run_dir), row["t1"], "--output", str(tmp_path / "plain"),
                                    "--no-postprocess", "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    assert "post-processing: none (--no-postprocess)" in cli.output
    plain = pd.read_csv(tmp_path / "plain" / "predictions.tsv", sep="\t", keep_default_na=False)
    assert plain.loc[0, "mask_raw"] == "n/a" and plain.loc[0, "components_removed"] == "n/a"
    assert np.array_equal(np.asarray(nib.load(tmp_path / "plain" / plain.loc[0, "mask"]).dataobj) > 0, raw)
    assert not list((tmp_path / "plain").rglob("*ResUNetRaw*"))

    (run_dir / "postprocess.json").unlink()                     # a run trained before post-processing existed
    old = predict(run_dir, [row["t1"]], tmp_path / "old", device="cpu", progress=False)
    assert "no postprocess.json" in old.table.loc[0, "postprocessing"]
    assert np.array_equal(np.asarray(nib.load(tmp_path / "old" / old.table.loc[0, "mask"]).dataobj) > 0, raw)


@pytest.mark.slow
def test_native_input_returns_to_its_own_grid(run, tmp_path, monkeypatch):
    """A scanner-space synthetic head: registered like normalize, and with the network replaced by the true
    template-space lesion, the mask that comes back on the native grid matches the native manual mask."""
    from atlas_curate.convert import convert
    from atlas_curate.synth import synthesize

    run_dir, _ = run
    truth = synthesize(tmp_path / "release", subjects=1, seed=11, flavour="native", truth=tmp_path / "truth",
                       progress=False)
    convert(tmp_path / "release", tmp_path / "bids", progress=False)
    t1 = next((tmp_path / "bids").glob("sub-*/ses-*/anat/*_T1w.nii.gz"))
    native_mask = next((tmp_path / "bids" / "derivatives" / "lesions").glob("sub-*/ses-*/anat/*_mask.nii.gz"))
    scan = next(iter(truth["scans"]))
    template_truth = next((tmp_path / "truth" / "masks").glob(f"{scan}_*dseg.nii.gz"))
    lesion = (np.asarray(nib.load(template_truth).dataobj) > 0).astype(np.float32)
    monkeypatch.setattr(Segmenter, "probability", lambda self, image: lesion)
    result = predict(run_dir, [t1], tmp_path / "out", native=True, device="cpu", progress=False)
    assert result.table["status"].tolist() == ["ok"], result.table["error"].tolist()
    out = tmp_path / "out" / result.table.loc[0, "mask"]
    assert "_space-orig_label-L_desc-ResUNet_mask" in out.name
    predicted, source = nib.load(out), nib.load(t1)
    assert predicted.shape == source.shape and np.allclose(predicted.affine, source.affine, atol=1e-4)
    reference = np.asarray(nib.load(native_mask).dataobj) > 0
    dice = _dice(np.asarray(predicted.dataobj) > 0, reference)
    assert dice > 0.85, dice            # 0.96 measured: registration error and nearest neighbour both ways
    shutil.rmtree(tmp_path / "release")
