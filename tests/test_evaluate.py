"""evaluate: per-scan metrics on the template grid, summaries, group tables, figure, predictions, ensembles,
and scoring a folder of any model's masks (our names or nnU-Net case ids) with the same figures.

The run-based tests need torch (the ``train`` extra); scoring saved masks does not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import ndimage

from atlas_curate import io, metrics
from atlas_curate.cli import main
from atlas_curate.evaluate import (
    evaluate,
    evaluate_predictions,
    find_bids_root,
    group_table,
    match_predictions,
    prediction_names,
    size_quartiles,
)
from atlas_curate.naming import SPACE
from atlas_curate.postprocess import PostProcessing, load_choice, postprocess, save_choice
from atlas_curate.templates import get_template, template_arrays


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("torch")
    from test_train import MICRO, write_toy_dataset  # tests/ is on sys.path under pytest

    from atlas_curate.train import train

    base = tmp_path_factory.mktemp("eval")
    table = write_toy_dataset(base / "bids")
    train(base / "bids", base / "bids" / "splits.tsv", base / "run", config=MICRO, device="cpu", progress=False)
    return base / "run", table


@pytest.fixture(scope="module")
def evaluated(run):
    run_dir, _ = run
    return evaluate(run_dir, device="cpu", progress=False, n_resamples=200)


def test_size_quartiles_and_names():
    volumes = pd.Series([50.0, 10.0, 80.0, 20.0, 70.0, 30.0, 60.0, 40.0])
    assert size_quartiles(volumes).tolist() == ["Q3", "Q1", "Q4", "Q1", "Q4", "Q2", "Q3", "Q2"]
    assert size_quartiles(pd.Series([5.0, 1.0])).tolist() == ["Q2", "Q1"]
    names = prediction_names("sub-r001s002_ses-1")
    assert names["mask"] == "sub-r001s002_ses-1_space-MNI152NLin2009aSym_label-L_desc-ResUNet_mask.nii.gz"
    assert names["probseg"].endswith("_label-L_desc-ResUNet_probseg.nii.gz")
    # a scan without a session, and (as the start of the name) anything else
    assert prediction_names("sub-r001s002") == {
        "mask": f"sub-r001s002_space-{SPACE}_label-L_desc-ResUNet_mask.nii.gz",
        "probseg": f"sub-r001s002_space-{SPACE}_label-L_desc-ResUNet_probseg.nii.gz"}
    assert prediction_names("case7")["mask"] == f"case7_space-{SPACE}_label-L_desc-ResUNet_mask.nii.gz"


def test_dsc_figure_leaves_the_matplotlib_backend_alone(tmp_path):
    """The figure draws on its own Agg canvas: a program's backend (here svg) is not changed, no pyplot."""
    code = ("import sys, matplotlib; matplotlib.use('svg'); import pandas as pd; "
            "from atlas_curate.evaluate import dsc_volume_figure; "
            "scans = pd.DataFrame({'volume_truth_mm3': [0.0, 800.0, 5000.0], 'dsc': [1.0, 0.4, 0.8], "
            "'size_quartile': ['Q1', 'Q2', 'Q3']}); dsc_volume_figure(scans, __import__('pathlib').Path(sys.argv[1]), "
            "'t'); assert matplotlib.get_backend() == 'svg' and 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "dsc.png")], check=True, timeout=120)
    assert (tmp_path / "dsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_matching_names_with_and_without_sessions(tmp_path):
    """Scan names and BIDS-style mask names, with or without a session; other spaces and suffixes refused."""
    for name in ("sub-a1.nii.gz", f"sub-a2_ses-1_space-{SPACE}_label-L_desc-X_mask.nii.gz",
                 "sub-a3_pred_mask.nii", "sub-a4_space-orig_mask.nii.gz", "sub-a5_probseg.nii.gz", "a6.nii.gz"):
        _save(_cube(2, 4), tmp_path / name)
    chosen, report, problems = match_predictions(
        tmp_path, ["sub-a1", "sub-a2_ses-1", "sub-a3", "sub-a4", "sub-a5"])
    assert {scan: path.name for scan, path in chosen.items()} == {
        "sub-a1": "sub-a1.nii.gz", "sub-a2_ses-1": f"sub-a2_ses-1_space-{SPACE}_label-L_desc-X_mask.nii.gz",
        "sub-a3": "sub-a3_pred_mask.nii"}
    reasons = report.set_index("file")["reason"]
    assert reasons["sub-a4_space-orig_mask.nii.gz"] == f"space-orig: not the {SPACE} grid of the manual masks"
    assert reasons["sub-a5_probseg.nii.gz"] == "not a mask (suffix _probseg)"
    assert "no cases table" in reasons["a6.nii.gz"]
    assert [scan for scan, _ in problems] == ["sub-a4", "sub-a5"]


def test_group_table():
    scans = pd.DataFrame({"g": ["a", "a", "b"], "volume_truth_mm3": [10.0, 30.0, 5.0], "dsc": [1.0, 0.5, 0.0],
                          "hd95": [0.0, 2.0, np.nan], "assd": [0.0, 1.0, np.nan], "tpr": [1.0, 0.5, 0.0],
                          "precision": [1.0, 0.5, np.nan], "lesion_f1": [1.0, 1.0, 0.0],
                          "tp_voxels": [10, 10, 0], "fp_voxels": [0, 10, 4], "fn_voxels": [0, 10, 5]})
    table = group_table(scans, "g").set_index("g")
    assert table.loc["a", "n"] == 2 and table.loc["a", "dsc_mean"] == 0.75
    assert table.loc["a", "lesion_f1_median"] == 1.0 and table.loc["b", "lesion_f1_mean"] == 0.0
    assert table.loc["a", "dsc_micro"] == pytest.approx(40 / 60)          # 2·20 / (2·20 + 10 + 10)
    assert table.loc["b", "volume_max_mm3"] == 5.0 and np.isnan(table.loc["b", "hd95_mean"])


def test_evaluate_writes_every_output(run, evaluated):
    run_dir, table = run
    out = evaluated.output
    assert out == run_dir / "eval-test"
    test_scans = sorted(table.loc[table["split"] == "test", "scan"])
    scans = pd.read_csv(out / "scans.tsv", sep="\t")
    assert scans["scan"].tolist() == test_scans
    for column in ("dsc", "hd", "hd95", "assd", "tpr", "precision", "volume_pred_mm3", "volume_truth_mm3",
                   "abs_volume_diff_mm3", "lesion_f1", "lesion_count_diff", "size_quartile", "vascular_territory"):
        assert column in scans.columns, column
    assert scans["dsc"].between(0, 1).all()
    assert np.allclose(scans["volume_truth_mm3"], table.set_index("scan").loc[test_scans, "lesion_volume_mm3"])
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("metric")
    assert summary.loc["dsc", "n"] == len(test_scans)
    assert summary.loc["dsc", "mean"] == pytest.approx(scans["dsc"].mean(), abs=1e-6)  # the TSV keeps 6 digits
    assert summary.loc["dsc", "mean_ci_low"] <= summary.loc["dsc", "mean"] <= summary.loc["dsc", "mean_ci_high"]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["micro_dsc"] == pytest.approx(metrics.micro_dsc(scans))
    assert {k: v["winner"] for k, v in doc["challenge"].items()} == metrics.CHALLENGE_WINNER
    assert doc["challenge"]["lesion_f1"]["ours_mean"] == pytest.approx(scans["lesion_f1"].mean())
    assert doc["lesion_connectivity"] == 6 and "ATLAS" in doc["lesion_convention"]
    quartiles = pd.read_csv(out / "by_size_quartile.tsv", sep="\t")
    assert quartiles["quartile"].tolist() == ["Q1", "Q2"] and quartiles["n"].sum() == len(test_scans)
    territory = pd.read_csv(out / "by_vascular_territory.tsv", sep="\t")
    assert territory["n"].sum() == len(test_scans)
    assert (out / "by_primary_lesion_location.tsv").is_file()
    cohort = pd.read_csv(out / "by_cohort.tsv", sep="\t")
    assert cohort["cohort"].tolist() == ["toy"] and cohort.loc[0, "n"] == len(test_scans)
    assert cohort.loc[0, "lesion_f1_mean"] == pytest.approx(scans["lesion_f1"].mean(), abs=1e-6)
    for name in ("scans", "summary", "by_size_quartile", "by_cohort", "by_vascular_territory"):
        assert set(pd.read_csv(out / f"{name}.tsv", sep="\t")["lesion_connectivity"]) == {6}, name
    text = evaluated.text()
    assert "by cohort" in text and "by lesion-size quartile" in text and "winner" in text
    assert (out / "dsc_vs_volume.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # predictions: on the template grid, raw mask = probability >= 0.5, mask = the raw mask post-processed with
    # the run's rule, metrics recomputed from the files agree
    tpl = nib.load(get_template().t1w)
    raw_files = pd.read_csv(out / "raw" / "scans.tsv", sep="\t").set_index("scan")["mask_file"]
    rule = load_choice(run_dir)[0]
    for row in scans.itertuples():
        mask_img = nib.load(out / row.mask_file)
        prob = np.asarray(nib.load(out / row.probseg_file).dataobj)
        assert io.grid_difference(tpl, mask_img) is None
        mask = np.asarray(mask_img.dataobj)
        raw = np.asarray(nib.load(out / "raw" / raw_files[row.scan]).dataobj) > 0
        assert set(np.unique(mask)) <= {0, 1} and 0 <= prob.min() and prob.max() <= 1
        assert np.array_equal(raw, prob >= 0.5)
        assert np.array_equal(mask > 0, postprocess(raw, rule)[0])
        truth = np.asarray(nib.load(table.set_index("scan").loc[row.scan, "mask"]).dataobj) > 0
        again = metrics.scan_metrics(mask, truth, (1.0, 1.0, 1.0))
        assert again["dsc"] == pytest.approx(row.dsc) and again["tp_voxels"] == row.tp_voxels


def test_perfect_segmentation_scores_one(run, monkeypatch):
    """With the network replaced by the truth, every scan scores DSC 1 and distance 0: the plumbing
    (template grid, orientation, thresholds, file names) adds no error."""
    from atlas_curate.train.infer import Segmenter

    run_dir, table = run
    truths = {}
    for row in table.itertuples():
        t1 = np.asarray(nib.load(row.t1).dataobj, dtype=np.float32)
        truths[float(t1.sum())] = np.asarray(nib.load(row.mask).dataobj).astype(np.float32)
    monkeypatch.setattr(Segmenter, "probability", lambda self, t1: truths[float(np.asarray(t1).sum())])
    result = evaluate(run_dir, split="dev", device="cpu", progress=False, n_resamples=50)
    assert result.output.name == "eval-dev"
    assert (result.scans["dsc"] == 1.0).all() and (result.scans["hd95"] == 0.0).all()
    assert result.micro_dsc == 1.0


def test_evaluate_reports_scores_with_and_without_postprocessing(run, tmp_path, monkeypatch):
    """The network replaced by the truth plus a 3-voxel speck in the brain and a block in the air, the run's rule
    set to < 20 mm³: post-processed masks score DSC 1, the raw ones less; both are reported (tables, summary.json,
    the printed summary, postprocess.tsv), and the predictions folder scored as a folder takes the post-processed
    masks, not the raw ones beside them."""
    from atlas_curate.train.infer import Segmenter

    source, table = run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.toml", "run.json", "model.pt", "postprocess.json"):
        shutil.copy(source / name, run_dir / name)
    record = json.loads((run_dir / "postprocess.json").read_text())
    save_choice({**record, "postprocessing": PostProcessing(min_size_mm3=20).to_dict(), "reason": "set here"}, run_dir)
    extra = np.zeros(tuple(get_template().shape), bool)
    extra[98, 150, 100:103] = True                       # a speck in the brain
    extra[2:7, 2:7, 2:6] = True                          # a block in the air
    assert template_arrays()["T1w"][98, 150, 100:103].min() > 0
    truths = {}
    for row in table.itertuples():
        t1 = np.asarray(nib.load(row.t1).dataobj, dtype=np.float32)
        truth = np.asarray(nib.load(row.mask).dataobj) > 0
        assert not (ndimage.binary_dilation(truth) & extra).any()
        truths[float(t1.sum())] = (truth | extra).astype(np.float32)
    monkeypatch.setattr(Segmenter, "probability", lambda self, t1: truths[float(np.asarray(t1).sum())])
    result = evaluate(run_dir, device="cpu", progress=False, n_resamples=50)
    out = result.output
    assert (result.scans["dsc"] == 1.0).all() and (result.scans["lesion_count_diff"] == 0).all()
    raw = pd.read_csv(out / "raw" / "scans.tsv", sep="\t")
    assert (raw["dsc"] < 1.0).all() and (raw["lesion_count_diff"] == 2).all()
    assert raw["dsc"].tolist() == pytest.approx(result.raw.scans["dsc"].tolist())
    for name in ("summary.tsv", "summary.json", "by_size_quartile.tsv", "by_cohort.tsv", "dsc_vs_volume.png"):
        assert (out / "raw" / name).is_file(), name
    assert all((out / "raw" / f).is_file() for f in raw["mask_file"])           # ../predictions/...Raw_mask
    assert all("desc-ResUNetRaw_mask" in f for f in raw["mask_file"])
    compare = pd.read_csv(out / "postprocess.tsv", sep="\t")
    assert compare["scan"].tolist() == result.scans["scan"].tolist()
    assert (compare["removed_small"] == 1).all() and (compare["removed_outside_brain"] == 1).all()
    assert (compare["voxels_removed"] == 103).all() and (compare["dsc"] == 1.0).all()
    assert compare["dsc_raw"].tolist() == pytest.approx(raw["dsc"].tolist(), abs=1e-6)
    assert compare["lesion_count_diff_raw"].tolist() == [2, 2] and set(compare["lesion_connectivity"]) == {6}
    doc = json.loads((out / "summary.json").read_text())
    assert doc["postprocessed"] is True and doc["postprocessing"]["min_size_mm3"] == 20
    assert doc["postprocessing"]["reason"] == "set here" and doc["metrics"]["dsc"]["mean"] == 1.0
    raw_doc = json.loads((out / "raw" / "summary.json").read_text())
    assert raw_doc["postprocessed"] is False
    assert doc["raw"]["metrics"] == raw_doc["metrics"] and doc["raw"]["micro_dsc"] == raw_doc["micro_dsc"] < 1
    assert doc["raw"]["challenge"]["lesion_count_diff"]["ours_mean"] == 2.0
    text = result.text()
    assert "post-processing: components smaller than 20 mm³" in text and "with and without post-processing" in text
    dsc_line = next(line for line in text.splitlines() if line.strip().startswith("dsc ") and "raw" in line)
    assert f"post-processed 1.000  raw {raw['dsc'].mean():.3f}" in dsc_line
    # the folder of predictions (masks, raw masks, probabilities) scored as any model's: the raw ones are set aside
    folder = evaluate_predictions(out / "predictions", json.loads((run_dir / "run.json").read_text())["splits"],
                                  output=tmp_path / "folder", progress=False, n_resamples=50)
    assert (folder.scans["dsc"] == 1.0).all()
    files = pd.read_csv(tmp_path / "folder" / "prediction_files.tsv", sep="\t")
    raw_rows = files[files["file"].str.contains("ResUNetRaw")]
    assert len(raw_rows) == 2 and not raw_rows["used"].any()
    assert raw_rows["reason"].str.contains("raw mask").all()


def test_ensemble_uses_the_snapshots(run):
    run_dir, _ = run
    result = evaluate(run_dir, ensemble=True, device="cpu", progress=False, n_resamples=50)
    assert result.output == run_dir / "eval-test-ensemble"
    doc = json.loads((result.output / "summary.json").read_text())
    assert doc["ensemble"] is True
    assert [p.split("/")[-1] for p in doc["models"]] == ["zoom_out-epoch1.pt", "zoom_out-epoch2.pt"]


def test_bad_inputs(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(io.InputError, match="run.json"):
        evaluate(tmp_path, device="cpu", progress=False)
    with pytest.raises(io.InputError, match="no scans in split 'validation'"):
        evaluate(run_dir, split="validation", device="cpu", progress=False)


# ------------------------------------------------------------------------------------------ any model's masks

def _save(mask, path, affine=None):
    io.save_nifti(nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), np.eye(4) if affine is None else affine), path)
    return path


def _points(*points, shape=(12, 12, 12)):
    mask = np.zeros(shape, bool)
    for point in points:
        mask[point] = True
    return mask


def _cube(lo, hi, shape=(12, 12, 12)):
    mask = np.zeros(shape, bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return mask


@pytest.fixture
def hand(tmp_path):
    """A small dataset scored by hand: three test scans in two cohorts and one train scan; the split table
    lies where `split` writes it (relative paths), the predictions folder mixes our names and case ids (mapped
    by a cases.tsv in the folder above), plus files that must not be used."""
    root = tmp_path / "bids"
    io.write_text('{"Name": "hand", "BIDSVersion": "1.10.0"}', root / "dataset_description.json")
    truth = {"sub-a1_ses-1": _cube(2, 6),                   # 64 voxels, found exactly
             "sub-a2_ses-1": _points((3, 3, 3)),             # 1 voxel; predicted with a corner-touching extra
             "sub-b1_ses-1": _cube(2, 5),                    # 27 voxels, missed
             "sub-t1_ses-1": _cube(2, 4)}                    # train scan: never scored
    pred = {"sub-a1_ses-1": _cube(2, 6), "sub-a2_ses-1": _points((3, 3, 3), (4, 4, 4)),
            "sub-b1_ses-1": np.zeros((12, 12, 12), bool), "sub-t1_ses-1": _cube(2, 4)}
    rows = []
    for scan, mask in truth.items():
        relative = f"derivatives/atlas-curate/{scan}_mask.nii.gz"
        _save(mask, root / relative)
        rows.append({"scan": scan, "subject": scan[4:6], "session": "1",
                     "split": "train" if scan.startswith("sub-t") else "test",
                     "cohort": "B" if scan.startswith("sub-b") else "A", "lesion_volume_mm3": float(mask.sum()),
                     "t1": relative.replace("_mask", "_T1w"), "mask": relative})
    split_file = root / "derivatives" / "atlas-curate" / "split.tsv"
    io.write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False), split_file)
    export = tmp_path / "raw" / "Dataset501_ATLAS"
    cases = {"sub-a2_ses-1": "a2ses1", "sub-b1_ses-1": "b1ses1", "sub-t1_ses-1": "t1ses1"}
    io.write_text("case\tscan\tsplit\n" + "".join(f"{c}\t{s}\tx\n" for s, c in cases.items()), export / "cases.tsv")
    folder = export / "predTs"
    _save(pred["sub-a1_ses-1"], folder / prediction_names("sub-a1_ses-1")["mask"])
    for scan, case in cases.items():
        _save(pred[scan], folder / f"{case}.nii.gz")
    _save(pred["sub-a1_ses-1"], folder / prediction_names("sub-a1_ses-1")["probseg"])   # not a mask
    io.write_text("notes", folder / "README.txt")                                       # not NIfTI
    return {"root": root, "split": split_file, "folder": folder, "truth": truth}


def test_scoring_a_folder_by_hand(hand):
    assert find_bids_root(hand["split"]) == hand["root"].resolve()
    result = evaluate_predictions(hand["folder"], hand["split"], progress=False, n_resamples=50)
    assert result.output == hand["folder"].resolve() / "eval-test"
    scans = result.scans.set_index("scan")
    assert scans.index.tolist() == ["sub-a1_ses-1", "sub-a2_ses-1", "sub-b1_ses-1"]
    assert scans["prediction_file"].tolist() == [prediction_names("sub-a1_ses-1")["mask"], "a2ses1.nii.gz",
                                                 "b1ses1.nii.gz"]
    # a1: exact; a2: DSC 2·1/(1 + 2), and the corner voxel is a second, false lesion (6-connected):
    # F1 = 1 / (1 + 1/2); b1: missed
    assert scans["dsc"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert scans["lesion_f1"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert scans["lesion_count_diff"].tolist() == [0, 1, 1]
    assert scans["abs_volume_diff_voxels"].tolist() == [0, 1, 27]
    summary = result.summary.set_index("metric")
    assert summary.loc["lesion_f1", "mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert summary.loc["lesion_count_diff", "mean"] == pytest.approx(2 / 3)
    assert summary.loc["abs_volume_diff_voxels", "mean"] == pytest.approx(28 / 3)
    cohort = pd.read_csv(result.output / "by_cohort.tsv", sep="\t").set_index("cohort")
    assert cohort["n"].to_dict() == {"A": 2, "B": 1}
    assert cohort.loc["A", "dsc_mean"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)
    assert cohort.loc["A", "lesion_f1_mean"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)
    assert cohort.loc["B", "dsc_mean"] == 0 and cohort.loc["B", "lesion_f1_mean"] == 0
    # size quartiles of the true volume (3 scans → 3 groups): 1 voxel, 27, 64
    quartile = pd.read_csv(result.output / "by_size_quartile.tsv", sep="\t").set_index("quartile")
    assert quartile["volume_min_mm3"].to_dict() == {"Q1": 1, "Q2": 27, "Q3": 64}
    assert quartile["lesion_f1_mean"].tolist() == pytest.approx([2 / 3, 0, 1], abs=1e-6)
    assert quartile["dsc_mean"].tolist() == pytest.approx([2 / 3, 0, 1], abs=1e-6)
    for name in ("scans", "summary", "by_cohort", "by_size_quartile", "prediction_files"):
        assert set(pd.read_csv(result.output / f"{name}.tsv", sep="\t")["lesion_connectivity"]) == {6}, name
    doc = json.loads((result.output / "summary.json").read_text())
    assert doc["lesion_connectivity"] == 6 and doc["challenge"]["lesion_f1"]["winner"] == 0.564
    assert doc["challenge"]["lesion_f1"]["ours_mean"] == pytest.approx(5 / 9)
    assert [g["cohort"] for g in doc["by_cohort"]] == ["A", "B"]
    assert doc["cases"].endswith("cases.tsv") and doc["n_files_ignored"] == 2
    files = pd.read_csv(result.output / "prediction_files.tsv", sep="\t").set_index("file")
    assert not files.loc["t1ses1.nii.gz", "used"]
    assert "sub-t1_ses-1 is not one of" in files.loc["t1ses1.nii.gz", "reason"]
    assert "not a mask" in files.loc[prediction_names("sub-a1_ses-1")["probseg"], "reason"]
    assert "README.txt" not in files.index
    text = result.text()
    assert "by cohort" in text and "by lesion-size quartile" in text and "challenge winner (test-set means)" in text
    assert "6-connected" in text and "2 NIfTI file(s)" in text


def test_a_raw_mask_is_used_only_without_another_mask(hand, tmp_path):
    """A desc-...Raw mask beside the scan's other mask is set aside (named, with the reason); alone, it is used."""
    folder = hand["folder"]
    raw_name = prediction_names("sub-a1_ses-1", raw=True)["mask_raw"]
    assert raw_name == f"sub-a1_ses-1_space-{SPACE}_label-L_desc-ResUNetRaw_mask.nii.gz"
    _save(_cube(1, 7), folder / raw_name)                                   # beside a1's mask: not used
    result = evaluate_predictions(folder, hand["split"], output=tmp_path / "a", progress=False, n_resamples=20)
    assert result.scans.set_index("scan").loc["sub-a1_ses-1", "dsc"] == 1.0
    files = pd.read_csv(tmp_path / "a" / "prediction_files.tsv", sep="\t").set_index("file")
    assert files.loc[raw_name, "used"] in (False, "false") and "raw mask" in files.loc[raw_name, "reason"]
    (folder / prediction_names("sub-a1_ses-1")["mask"]).unlink()           # alone: the raw mask is the prediction
    result = evaluate_predictions(folder, hand["split"], output=tmp_path / "b", progress=False, n_resamples=20)
    assert result.scans.set_index("scan").loc["sub-a1_ses-1", "dsc"] == pytest.approx(2 * 64 / (64 + 216))


def test_scoring_on_dask_writes_the_same_files(hand, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    local = evaluate_predictions(hand["folder"], hand["split"], output=tmp_path / "local", progress=False,
                                 n_resamples=50)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        dask = evaluate_predictions(hand["folder"], hand["split"], output=tmp_path / "dask", progress=False,
                                    n_resamples=50, executor="dask", scheduler=cluster.scheduler_address)
    files = sorted(p.name for p in local.output.iterdir())
    assert files == sorted(p.name for p in dask.output.iterdir()) and "dsc_vs_volume.png" in files
    for name in files:
        ours, theirs = (local.output / name).read_bytes(), (dask.output / name).read_bytes()
        assert ours.replace(b"/local", b"/dask") == theirs, name


def test_scoring_a_folder_with_26_connectivity(hand, tmp_path):
    result = evaluate_predictions(hand["folder"], hand["split"], output=tmp_path / "out26", connectivity=26,
                                  progress=False, n_resamples=50)
    assert result.output == tmp_path / "out26"
    scans = result.scans.set_index("scan")
    assert scans["lesion_f1"].tolist() == [1.0, 1.0, 0.0]          # the corner voxel joins the true lesion
    assert scans["lesion_count_diff"].tolist() == [0, 0, 1]
    assert scans["dsc"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])   # voxel overlap: unchanged
    doc = json.loads((result.output / "summary.json").read_text())
    assert doc["lesion_connectivity"] == 26 and doc["challenge"] is None and "ISLES" in doc["lesion_convention"]
    for name in ("scans", "summary", "by_cohort", "by_size_quartile"):
        assert set(pd.read_csv(result.output / f"{name}.tsv", sep="\t")["lesion_connectivity"]) == {26}, name
    text = result.text()
    assert "26-connected" in text and "challenge winner (test-set means)" not in text and "no comparison" in text
    with pytest.raises(ValueError, match="connectivity"):
        evaluate_predictions(hand["folder"], hand["split"], connectivity=18, progress=False)


def test_missing_duplicate_and_off_grid_predictions_are_named(hand, tmp_path):
    folder = hand["folder"]
    (folder / "b1ses1.nii.gz").unlink()                                            # missing
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    _save(_points((3, 3, 3)), folder / "a2ses1.nii.gz", affine=shifted)            # off the truth's grid
    _save(_cube(2, 6), folder / "sub-a1_ses-1.nii.gz")                             # a second file for a1
    with pytest.raises(io.InputError) as err:
        evaluate_predictions(folder, hand["split"], output=tmp_path / "out", progress=False)
    message = str(err.value)
    assert "3 of 3 scans" in message and "nothing was scored" in message
    assert "sub-b1_ses-1: no prediction" in message and "b1ses1.nii.gz" in message
    assert "a2ses1.nii.gz: not on the grid of the manual mask" in message and "affine" in message
    assert "sub-a1_ses-1: more than one prediction" in message and "sub-a1_ses-1.nii.gz" in message
    assert not (tmp_path / "out" / "scans.tsv").exists()
    files = pd.read_csv(tmp_path / "out" / "prediction_files.tsv", sep="\t").set_index("file")
    assert not files.loc["a2ses1.nii.gz", "used"] and "affine" in files.loc["a2ses1.nii.gz", "reason"]


def test_probability_maps_and_unmapped_names_are_refused(hand, tmp_path):
    folder = hand["folder"]
    for path in folder.glob("*.nii.gz"):
        path.unlink()
    for scan in ("sub-a1_ses-1", "sub-a2_ses-1"):
        _save(hand["truth"][scan], folder / prediction_names(scan)["mask"])
    probability = nib.Nifti1Image(hand["truth"]["sub-b1_ses-1"].astype(np.float32) * 0.7, np.eye(4))
    io.save_nifti(probability, folder / prediction_names("sub-b1_ses-1")["mask"])
    with pytest.raises(RuntimeError, match="sub-b1_ses-1.*not a label mask"):
        evaluate_predictions(folder, hand["split"], output=tmp_path / "a", progress=False)
    # case ids without a cases table: named, with the reason
    (folder / prediction_names("sub-b1_ses-1")["mask"]).unlink()
    _save(hand["truth"]["sub-b1_ses-1"], folder / "b1ses1.nii.gz")
    (folder.parent / "cases.tsv").unlink()
    with pytest.raises(io.InputError, match="sub-b1_ses-1: no prediction"):
        evaluate_predictions(folder, hand["split"], output=tmp_path / "b", progress=False)
    files = pd.read_csv(tmp_path / "b" / "prediction_files.tsv", sep="\t").set_index("file")
    assert "no cases table" in files.loc["b1ses1.nii.gz", "reason"]
    # ... and found again with --cases
    cases = tmp_path / "given" / "cases.tsv"
    io.write_text("case\tscan\nb1ses1\tsub-b1_ses-1\n", cases)
    result = evaluate_predictions(folder, hand["split"], cases=cases, output=tmp_path / "c", progress=False,
                                  n_resamples=20)
    assert (result.scans["dsc"] == 1.0).all()
    # ... or through the input folder nnUNetv2_predict recorded (predictions saved away from the export)
    export = tmp_path / "raw" / "Dataset501_ATLAS"
    (export / "imagesTs").mkdir(parents=True)
    shutil.copy(cases, export / "cases.tsv")
    moved = shutil.move(str(folder), str(tmp_path / "nnunet-predictions"))
    io.write_text(json.dumps({"list_of_lists_or_source_folder": str(export / "imagesTs")}),
                  tmp_path / "nnunet-predictions" / "predict_from_raw_data_args.json")
    result = evaluate_predictions(moved, hand["split"], output=tmp_path / "d", progress=False, n_resamples=20)
    assert (result.scans["dsc"] == 1.0).all()
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["cases"] == str((export / "cases.tsv").resolve())


def test_split_paths_need_a_bids_root(hand, tmp_path):
    moved = tmp_path / "elsewhere" / "split.tsv"
    moved.parent.mkdir()
    shutil.copy(hand["split"], moved)
    with pytest.raises(io.InputError, match="BIDS root"):
        evaluate_predictions(hand["folder"], moved, progress=False)
    result = evaluate_predictions(hand["folder"], moved, bids_root=hand["root"], output=tmp_path / "out",
                                  progress=False, n_resamples=20)
    assert len(result.scans) == 3


def test_predictions_folder_gives_the_run_figures(run, evaluated, tmp_path):
    """A run's test predictions renamed to the nnU-Net case ids of `export nnunet` and scored as a folder give
    exactly the figures of `evaluate RUN`."""
    from atlas_curate.export import export_nnunet

    run_dir, table = run
    doc = json.loads((run_dir / "run.json").read_text())
    dataset = export_nnunet(doc["bids_root"], doc["splits"], tmp_path / "raw")
    cases = pd.read_csv(dataset / "cases.tsv", sep="\t").set_index("scan")["case"]
    folder = dataset / "predTs"
    folder.mkdir()
    ours = pd.read_csv(evaluated.output / "scans.tsv", sep="\t")
    for row in ours.itertuples():
        shutil.copy(evaluated.output / row.mask_file, folder / f"{cases[row.scan]}.nii.gz")
    result = evaluate_predictions(folder, doc["splits"], progress=False, n_resamples=200)
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == sorted(f"{cases[s]}.nii.gz" for s in ours["scan"])

    columns = [c for c in evaluated.scans.columns if c not in ("mask_file", "probseg_file")]
    pd.testing.assert_frame_equal(result.scans[columns], evaluated.scans[columns])
    pd.testing.assert_frame_equal(result.summary, evaluated.summary)
    assert result.micro_dsc == evaluated.micro_dsc
    for name in ("summary", "by_size_quartile", "by_cohort", "by_vascular_territory", "by_primary_lesion_location"):
        pd.testing.assert_frame_equal(pd.read_csv(result.output / f"{name}.tsv", sep="\t"),
                                      pd.read_csv(evaluated.output / f"{name}.tsv", sep="\t"), obj=name)
    ours_doc = json.loads((evaluated.output / "summary.json").read_text())
    theirs_doc = json.loads((result.output / "summary.json").read_text())
    for key in ("metrics", "challenge", "micro_dsc", "by_cohort", "by_size_quartile", "lesion_connectivity"):
        assert theirs_doc[key] == ours_doc[key], key

    # the command line: `evaluate --predictions DIR --split FILE` (default 1000 resamples: per-scan figures and
    # means equal; the CIs depend on the resample count only)
    out = tmp_path / "cli"
    cli = CliRunner().invoke(main, ["evaluate", "--predictions", str(folder), "--split", doc["splits"],
                                    "--output", str(out)])
    assert cli.exit_code == 0, cli.output
    assert "by cohort" in cli.output and "winner" in cli.output
    scans = pd.read_csv(out / "scans.tsv", sep="\t")
    for column in metrics.SCAN_METRIC_KEYS:
        assert scans[column].equals(ours[column]), column
    means = pd.read_csv(out / "summary.tsv", sep="\t").set_index("metric")["mean"]
    assert means.equals(pd.read_csv(evaluated.output / "summary.tsv", sep="\t").set_index("metric")["mean"])
