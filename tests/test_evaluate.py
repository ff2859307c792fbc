"""evaluate: per-scan metrics on the template grid, summaries, group tables, figure, predictions, ensembles."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
metrics = pytest.importorskip("atlas_curate.metrics")

from test_train import MICRO, write_toy_dataset  # noqa: E402  (tests/ is on sys.path under pytest)

from atlas_curate import io  # noqa: E402
from atlas_curate.evaluate import evaluate, group_table, prediction_names, size_quartiles  # noqa: E402
from atlas_curate.templates import get_template  # noqa: E402
from atlas_curate.train import train  # noqa: E402
from atlas_curate.train.infer import Segmenter  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
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


def test_group_table():
    scans = pd.DataFrame({"g": ["a", "a", "b"], "volume_truth_mm3": [10.0, 30.0, 5.0], "dsc": [1.0, 0.5, 0.0],
                          "hd95": [0.0, 2.0, np.nan], "assd": [0.0, 1.0, np.nan], "tpr": [1.0, 0.5, 0.0],
                          "precision": [1.0, 0.5, np.nan], "lesion_f1": [1.0, 1.0, 0.0],
                          "tp_voxels": [10, 10, 0], "fp_voxels": [0, 10, 4], "fn_voxels": [0, 10, 5]})
    table = group_table(scans, "g").set_index("g")
    assert table.loc["a", "n"] == 2 and table.loc["a", "dsc_mean"] == 0.75
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
    quartiles = pd.read_csv(out / "by_size_quartile.tsv", sep="\t")
    assert quartiles["quartile"].tolist() == ["Q1", "Q2"] and quartiles["n"].sum() == len(test_scans)
    territory = pd.read_csv(out / "by_vascular_territory.tsv", sep="\t")
    assert territory["n"].sum() == len(test_scans)
    assert (out / "by_primary_lesion_location.tsv").is_file()
    assert (out / "dsc_vs_volume.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # predictions: on the template grid, mask = probability >= 0.5, metrics recomputed from the files agree
    tpl = nib.load(get_template().t1w)
    for row in scans.itertuples():
        mask_img = nib.load(out / row.mask_file)
        prob = np.asarray(nib.load(out / row.probseg_file).dataobj)
        assert io.grid_difference(tpl, mask_img) is None
        mask = np.asarray(mask_img.dataobj)
        assert set(np.unique(mask)) <= {0, 1} and 0 <= prob.min() and prob.max() <= 1
        assert np.array_equal(mask > 0, prob >= 0.5)
        truth = np.asarray(nib.load(table.set_index("scan").loc[row.scan, "mask"]).dataobj) > 0
        again = metrics.scan_metrics(mask, truth, (1.0, 1.0, 1.0))
        assert again["dsc"] == pytest.approx(row.dsc) and again["tp_voxels"] == row.tp_voxels


def test_perfect_segmentation_scores_one(run, monkeypatch):
    """With the network replaced by the truth, every scan scores DSC 1 and distance 0: the plumbing
    (template grid, orientation, thresholds, file names) adds no error."""
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
