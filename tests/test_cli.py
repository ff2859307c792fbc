"""The click command line: help, version, synth argument checks."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import atlas_curate
from atlas_curate.cli import main


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help_lists_subcommands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:", 1)[1]
    assert "synth" in commands
    assert "demo" in commands
    assert runner.invoke(main, ["-h"]).output == result.output


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert atlas_curate.__version__ in result.output
    assert result.output.strip() == f"atlas-curate, version {atlas_curate.__version__}"


def test_synth_help(runner):
    result = runner.invoke(main, ["synth", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--faults", "--flavour", "--subjects", "--seed", "--truth"):
        assert option in result.output
    assert "native" in result.output and "standard" in result.output


def test_synth_rejects_bad_arguments(runner, tmp_path):
    result = runner.invoke(main, ["synth", str(tmp_path / "out"), "--flavour", "mni"])
    assert result.exit_code == 2
    assert "--flavour" in result.output
    result = runner.invoke(main, ["synth", str(tmp_path / "out"), "--subjects", "0"])
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_synth_into_non_empty_folder_fails(runner, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = runner.invoke(main, ["synth", str(out), "--subjects", "1"])
    assert result.exit_code != 0
    message = result.output + str(result.exception or "")
    assert "not empty" in message
    assert str(out) in message
    # nothing was written: the user's file is untouched and no truth folder appeared
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_console_entry_reports_non_empty_folder_in_one_line(tmp_path, monkeypatch, capsys):
    """The installed ``atlas-curate`` command (``cli.run``) turns the error into one clear line."""
    from atlas_curate.cli import run

    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    monkeypatch.setattr("sys.argv", ["atlas-curate", "synth", str(out), "--subjects", "1"])
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "not empty" in err and str(out) in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_agreement_command_table_json_and_grid_error(tmp_path):
    import json

    import nibabel as nib
    import numpy as np

    from atlas_curate.cli import main

    cube = np.zeros((20, 20, 20), np.uint8)
    cube[5:10, 5:10, 5:10] = 1
    nib.save(nib.Nifti1Image(cube, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.roll(cube, 2, 0), np.eye(4)), tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(cube, np.diag([2.0, 1, 1, 1])), tmp_path / "c.nii.gz")
    runner = CliRunner()
    result = runner.invoke(main, ["agreement", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--json"])
    assert result.exit_code == 0, result.output
    (pair,) = json.loads(result.output)
    assert pair["dsc"] == 0.6 and pair["hd"] == 2.0  # 5-voxel cubes shifted by 2: 2*75/250
    result = runner.invoke(main, ["agreement", str(tmp_path / "a.nii.gz"), str(tmp_path / "c.nii.gz")])
    assert result.exit_code != 0 and "c.nii.gz" in str(result.exception)


def test_agreement_command_connectivity_and_both_hd95(tmp_path):
    import json
    import math

    import nibabel as nib
    import numpy as np

    one = np.zeros((8, 8, 8), np.uint8)
    one[3, 3, 3] = 1
    two = one.copy()
    two[4, 4, 4] = 1                    # touches the first voxel at a corner only
    nib.save(nib.Nifti1Image(one, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(two, np.eye(4)), tmp_path / "b.nii.gz")
    paths = [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]
    runner = CliRunner()
    result = runner.invoke(main, ["agreement", *paths, "--json"])
    assert result.exit_code == 0, result.output
    (pair,) = json.loads(result.output)
    # ATLAS 2022 scorer (6-connected): b has 2 lesions, one touching no voxel of a: F1 = 1 / (1 + 1/2)
    assert pair["lesion_f1"] == 1 / (1 + 1 / 2) and pair["lesion_count_diff"] == 1
    assert pair["lesion_connectivity"] == 6
    # b → a {0, √3}, a → b {0}: max directed p95 = 0.95·√3; MedPy's pooled p95 of {0, 0, √3} = 0.9·√3
    assert math.isclose(pair["hd95"], 0.95 * math.sqrt(3)) and math.isclose(pair["hd95_pooled"], 0.9 * math.sqrt(3))
    assert (pair["volume_diff_voxels"], pair["abs_volume_diff_voxels"]) == (1, 1)
    result = runner.invoke(main, ["agreement", *paths, "--json", "--connectivity", "26"])
    assert result.exit_code == 0, result.output
    (pair,) = json.loads(result.output)
    assert (pair["lesion_f1"], pair["lesion_count_diff"], pair["lesion_connectivity"]) == (1.0, 0, 26)
    result = runner.invoke(main, ["agreement", *paths])
    assert result.exit_code == 0 and "6-connected" in result.output and "hd95_pooled" in result.output
    result = runner.invoke(main, ["agreement", *paths, "--connectivity", "18"])
    assert result.exit_code == 2 and "--connectivity" in result.output


def test_evaluate_command_forms_and_usage_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", "--help"])
    assert result.exit_code == 0
    for option in ("--predictions", "--split", "--subset", "--cases", "--connectivity", "--bids-root"):
        assert option in result.output, option
    (tmp_path / "preds").mkdir()
    (tmp_path / "run").mkdir()
    split = tmp_path / "split.tsv"
    split.write_text("scan\tsubject\tsplit\tt1\tmask\n")
    for args, message in (
            ([], "either RUN_DIR or --predictions"),
            ([str(tmp_path / "run"), "--predictions", str(tmp_path / "preds")], "either RUN_DIR or --predictions"),
            (["--predictions", str(tmp_path / "preds")], "--split FILE"),
            (["--predictions", str(tmp_path / "preds"), "--split", str(split), "--ensemble"], "--ensemble"),
            ([str(tmp_path / "run"), "--cases", str(split)], "only with --predictions"),
            ([str(tmp_path / "run"), "--connectivity", "18"], "--connectivity")):
        result = runner.invoke(main, ["evaluate", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_split_and_export_commands(standard_release, tmp_path):
    from atlas_curate.convert import convert

    bids = tmp_path / "bids"
    convert(standard_release.root, bids, progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["split", str(bids), "--seed", "3", "--output", str(tmp_path / "s.tsv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.tsv").is_file() and (tmp_path / "s.json").is_file()
    assert "train" in result.output and "excluded" in result.output  # balance table and the withheld-mask scans
    result = runner.invoke(main, ["export", "nnunet", str(bids), str(tmp_path / "s.tsv"), str(tmp_path / "nn")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "nn" / "Dataset501_ATLAS" / "dataset.json").is_file()


def test_overlap_map_command_and_where_error(standard_release, tmp_path):
    from atlas_curate.convert import convert

    bids = tmp_path / "bids"
    convert(standard_release.root, bids, progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["overlap-map", str(bids)])
    assert result.exit_code == 0, result.output
    out = bids / "derivatives" / "atlas-curate" / "overlap"
    assert (out / "overlap_prob.nii.gz").is_file() and (out / "lesions.tsv").is_file()
    assert "overlap" in result.output
    result = runner.invoke(main, ["overlap-map", str(bids), "--where", "no_such_column > 1"])
    assert result.exit_code != 0
    assert "no_such_column" in str(result.exception) or "no_such_column" in result.output


@pytest.mark.slow
def test_demo_atlas2_without_training(tmp_path):
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "demo"), "--flavour", "atlas2", "--subjects", "5",
                                       "--faults", "--no-train"])
    assert result.exit_code == 0, result.output
    for stage in ("synth", "bids-convert", "normalize", "overlap-map", "split"):
        assert f"[demo] {stage}" in result.output
        assert re.search(rf"^ +{stage} +\d+\.\d s$", result.output, re.M), f"no wall time for {stage}"
    index = tmp_path / "demo" / "bids" / "derivatives" / "atlas-curate" / "index.html"
    assert result.output.strip().splitlines()[-1].endswith(str(index)) and index.is_file()
    assert (tmp_path / "demo" / "bids" / "derivatives" / "atlas-curate" / "overlap" / "overlap_prob.nii.gz").is_file()
    assert (tmp_path / "demo" / "bids" / "derivatives" / "atlas-curate" / "split.tsv").is_file()


def test_training_commands_are_wired():
    runner = CliRunner()
    for command in ("train-baseline", "evaluate", "predict", "split", "overlap-map", "agreement"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
    result = runner.invoke(main, ["train-baseline", "--help"])
    assert "--preset" in result.output and "--resume" in result.output


def test_normalize_participant_label_takes_several_labels_after_one_flag(tmp_path, monkeypatch):
    """BIDS Apps style: ``--participant-label 01 02`` (and repeated flags, with or without ``sub-``) reach
    normalize as one list; a label with no T1w is an error naming it, not a silent no-op."""
    import atlas_curate.normalize as norm
    from atlas_curate.normalize.pipeline import find_inputs

    seen = {}

    def fake_normalize(root, **kwargs):
        seen["labels"] = kwargs["participant_labels"]
        raise ValueError("stop here")

    monkeypatch.setattr(norm, "normalize", fake_normalize)
    runner = CliRunner()
    for args, expected in [(["--participant-label", "01", "02", "--jobs", "1"], ["01", "02"]),
                           (["--participant-label", "01", "--participant-label", "sub-03"], ["01", "sub-03"]),
                           (["--participant-label", "01"], ["01"])]:
        result = runner.invoke(main, ["normalize", str(tmp_path), *args])
        assert seen.pop("labels") == expected, result.output
    # a label without a scan
    anat = tmp_path / "sub-01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_ses-1_T1w.nii.gz").write_bytes(b"")
    assert [f.scan.sub for f in find_inputs(tmp_path, ["sub-01"])] == ["01"]
    with pytest.raises(ValueError, match="02"):
        find_inputs(tmp_path, ["01", "02"])


def test_executor_options_reach_overlap_export_and_evaluate(tmp_path, monkeypatch):
    """overlap-map, export nnunet and evaluate take --jobs/--executor/--scheduler like the other per-scan stages
    and pass executor= and scheduler= to the library; normalize has no --template (the template is fixed)."""
    import atlas_curate.evaluate as evaluate_module
    import atlas_curate.export as export_module
    import atlas_curate.overlap as overlap_module

    seen = {}

    def fake(name):
        def record(*args, **kwargs):
            seen[name] = {key: kwargs.get(key) for key in ("jobs", "executor", "scheduler")}
            raise ValueError("stop here")
        return record

    monkeypatch.setattr(overlap_module, "overlap_map", fake("overlap-map"))
    monkeypatch.setattr(export_module, "export_nnunet", fake("export"))
    monkeypatch.setattr(evaluate_module, "evaluate", fake("evaluate"))
    monkeypatch.setattr(evaluate_module, "evaluate_predictions", fake("evaluate --predictions"))
    bids, run_dir, predictions = (tmp_path / name for name in ("bids", "run", "pred"))
    for folder in (bids, run_dir, predictions):
        folder.mkdir()
    splits = tmp_path / "split.tsv"
    splits.write_text("scan\tsplit\n")
    dask = ["--jobs", "2", "--executor", "dask", "--scheduler", "tcp://127.0.0.1:8786"]
    runner = CliRunner()
    for name, args in [("overlap-map", ["overlap-map", str(bids)]),
                       ("export", ["export", "nnunet", str(bids), str(splits), str(tmp_path / "out")]),
                       ("evaluate", ["evaluate", str(run_dir)]),
                       ("evaluate --predictions", ["evaluate", "--predictions", str(predictions), "--split",
                                                   str(splits)])]:
        runner.invoke(main, args + dask)
        assert seen.pop(name) == {"jobs": 2, "executor": "dask", "scheduler": "tcp://127.0.0.1:8786"}, name
        runner.invoke(main, args + ["--jobs", "1"])
        assert seen.pop(name) == {"jobs": 1, "executor": "local", "scheduler": None}, name
    result = runner.invoke(main, ["normalize", str(bids), "--template", "mni2009"])
    assert result.exit_code == 2 and "No such option" in result.output and "--template" in result.output
