"""The naming spec (metadata/outputs.json), the scan record and the one table/JSON convention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlas_curate import naming, tables
from atlas_curate.executor import Skip
from atlas_curate.templates import registry, template_grid

# --- naming spec -----------------------------------------------------------------------------------------

def test_spec_defines_template_space_and_version_once():
    spec = naming.spec()
    assert spec["template"] in registry()
    assert naming.TEMPLATE_KEY == spec["template"]
    assert naming.SPACE == registry()[spec["template"]]["name"]
    assert naming.BIDS_VERSION == spec["bids_version"]
    assert naming.LESION_DERIVATIVE == Path("derivatives/lesions")
    assert naming.PIPELINE_DERIVATIVE == Path("derivatives/atlas-curate")


def test_every_spec_output_builds_a_valid_bids_name():
    scan = naming.ScanRef("c0001s0001", "t01")
    for key, entry in naming.spec()["outputs"].items():
        path = naming.output_path(key, scan, space=naming.SPACE)
        parsed = naming.parse_bids_name(path.name)
        assert parsed is not None, key
        entities, suffix, ext = parsed
        assert suffix == entry["suffix"] and ext == entry.get("extension", ".nii.gz")
        assert entities["sub"] == "c0001s0001" and entities["ses"] == "t01"
        assert list(entities) == [e for e in naming.BIDS_ENTITY_ORDER if e in entities], key   # BIDS order
        assert "{space}" not in str(path)
        assert path.parts[0] != "sub-c0001s0001" or entry["dataset"] in ("raw", "")


def test_output_paths_match_the_documented_layout():
    scan = naming.ScanRef("c0001s0001", "t01")
    assert naming.output_path("norm_mask", scan, space=naming.SPACE).as_posix() == (
        "derivatives/atlas-curate/sub-c0001s0001/ses-t01/anat/"
        "sub-c0001s0001_ses-t01_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz")
    assert naming.output_path("figure", scan).as_posix() == (
        "derivatives/atlas-curate/sub-c0001s0001/figures/sub-c0001s0001_ses-t01_desc-normalize_T1w.png")
    assert naming.output_path("t1w", scan).as_posix() == "sub-c0001s0001/ses-t01/anat/sub-c0001s0001_ses-t01_T1w.nii.gz"
    assert naming.output_path("lesion_dseg_tsv", scan, space="orig").as_posix() == (
        "derivatives/lesions/sub-c0001s0001/ses-t01/anat/sub-c0001s0001_ses-t01_space-orig_desc-lesions_dseg.tsv")
    # the same as the hand-written bids_path the stages used before the spec
    assert naming.output_path("lesion_mask", scan, space="orig") == naming.LESION_DERIVATIVE / naming.bids_path(
        "c0001s0001", "t01", "mask", space="orig", label="L", desc="T1lesion")


def test_session_less_scan_paths():
    scan = naming.ScanRef("lab01")
    assert scan.key == "sub-lab01" and scan.session_id is None
    assert naming.output_path("preproc_t1w", scan, space=naming.SPACE).as_posix() == (
        "derivatives/atlas-curate/sub-lab01/anat/sub-lab01_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz")
    assert scan.folder().as_posix() == "sub-lab01/anat"


def test_space_placeholder_needs_a_space_and_entities_override():
    scan = naming.ScanRef("a", "1")
    with pytest.raises(ValueError, match="space"):
        naming.output_path("lesion_mask", scan)
    assert "desc-other" in naming.output_path("lesion_mask", scan, space="orig", desc="other").name
    assert "label-" not in naming.output_path("lesion_mask", scan, space="orig", label=None).name
    with pytest.raises(KeyError, match="unknown output 'nope'"):
        naming.output_path("nope", scan)


def test_output_sidecar_merges_fixed_fields():
    doc = naming.output_sidecar("xfm", space=naming.SPACE, AffineRAS=[[1]])
    assert doc == {"FromSpace": "T1w", "ToSpace": naming.SPACE, "AffineRAS": [[1]]}
    assert naming.output_sidecar("norm_mask", space=naming.SPACE, Type="Other")["Type"] == "Other"


# --- ScanRef --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, sub, ses", [("sub-a", "a", None), ("sub-r001s001_ses-1", "r001s001", "1"),
                                            ("sub-c0001s0001_ses-t01", "c0001s0001", "t01")])
def test_scanref_parse_round_trip(text, sub, ses):
    scan = naming.ScanRef.parse(text)
    assert (scan.sub, scan.ses) == (sub, ses)
    assert scan.key == text == str(scan)
    assert naming.ScanRef.parse(scan.key) == scan


@pytest.mark.parametrize("text", ["sub-a_T1w", "a_ses-1", "sub-a_ses-", "sub-a-b", "sub-a_ses-1_run-1", ""])
def test_scanref_parse_refuses_other_text(text):
    with pytest.raises(ValueError, match="not a scan name"):
        naming.ScanRef.parse(text)


def test_scanref_from_file_names_and_label_check():
    assert naming.ScanRef.from_name("sub-a_ses-1_space-orig_T1w.nii.gz") == naming.ScanRef("a", "1")
    assert naming.ScanRef.from_name("sub-a_T1w.nii.gz") == naming.ScanRef("a")
    assert naming.ScanRef.from_name("sub-a.nii.gz") == naming.ScanRef("a")
    assert naming.ScanRef.from_name("c0001s0001t01.nii.gz") is None
    with pytest.raises(ValueError, match="invalid BIDS label"):
        naming.ScanRef("a_b")


def test_parse_bids_name():
    assert naming.parse_bids_name("sub-a_ses-1_acq-mp2rage_run-2_T1w.nii.gz") == (
        {"sub": "a", "ses": "1", "acq": "mp2rage", "run": "2"}, "T1w", ".nii.gz")
    assert naming.parse_bids_name("sub-a_from-T1w_to-X_mode-image_xfm.mat")[1:] == ("xfm", ".mat")
    assert naming.parse_bids_name("participants.tsv") == ({}, "participants", ".tsv")
    assert naming.parse_bids_name("c0001s0001t01_LesionSmooth.nii.gz") is None


# --- tables ---------------------------------------------------------------------------------------------

def test_tsv_booleans_are_lowercase_and_read_back(tmp_path):
    frame = pd.DataFrame({"scan": ["sub-a", "sub-b", "sub-c"], "qc_pass": [True, False, None],
                          "value": [1.5, np.nan, 2.0], "note": ["x", "", None]})
    path = tables.write_tsv(frame, tmp_path / "t.tsv")
    text = path.read_text()
    assert text.splitlines() == ["scan\tqc_pass\tvalue\tnote", "sub-a\ttrue\t1.5\tx", "sub-b\tfalse\tn/a\t",
                                 "sub-c\tn/a\t2.0\tn/a"]
    back = tables.read_tsv(path)
    assert [tables.as_bool(v) for v in back["qc_pass"]] == [True, False, None]
    assert back["value"].isna().tolist() == [False, True, False]


def test_tsv_all_bool_column_and_integer_columns(tmp_path):
    frame = pd.DataFrame({"ok": [True, False], "n": [1.0, np.nan]})
    text = tables.tsv_text(frame, integer_columns=("n",))
    assert text == "ok\tn\ntrue\t1\nfalse\tn/a\n"
    assert frame["ok"].dtype == bool   # the caller's frame is not changed


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), (True, True),
                                             (np.bool_(False), False), ("false", False), ("False", False),
                                             ("0", False), ("n/a", None), ("", None), (None, None),
                                             (float("nan"), None)])
def test_as_bool_reads_every_version(value, expected):
    assert tables.as_bool(value) is expected


def test_write_rows_cells(tmp_path):
    path = tables.write_rows([{"a": True, "b": "two  words\n"}, {"a": None, "b": 3}], ["a", "b"], tmp_path / "r.tsv")
    assert path.read_text() == "a\tb\ntrue\ttwo words\nn/a\t3\n"


def test_json_convention(tmp_path):
    path = tables.write_json({"b": np.float32(0.5), "a": np.int64(3), "c": np.float32("nan"), "d": Path("x/y"),
                              "e": np.bool_(True), "f": np.arange(2)}, tmp_path / "d.json")
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": 3, "b": 0.5, "c": None, "d": "x/y", "e": True, "f": [0, 1]}
    with pytest.raises(ValueError):
        tables.write_json({"x": float("nan")}, tmp_path / "e.json", allow_nan=False)
    assert not (tmp_path / "e.json").exists()


def test_dataset_description(tmp_path):
    tables.write_dataset_description(tmp_path / "deriv", "atlas-curate x", description="does x")
    doc = json.loads((tmp_path / "deriv" / "dataset_description.json").read_text())
    assert doc["BIDSVersion"] == naming.BIDS_VERSION and doc["DatasetType"] == "derivative"
    assert doc["GeneratedBy"][0]["Name"] == "atlas-curate" and doc["GeneratedBy"][0]["Description"] == "does x"
    assert doc["DatasetLinks"] == {"raw": "../../"} and doc["SourceDatasets"] == [{"URL": "bids:raw:"}]
    tables.write_dataset_description(tmp_path / "raw", "raw", dataset_type="raw", License="CC0")
    raw = json.loads((tmp_path / "raw" / "dataset_description.json").read_text())
    assert "SourceDatasets" not in raw and raw["License"] == "CC0" and raw["DatasetType"] == "raw"


def test_manifest_skips_only_current_outputs(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a")
    (tmp_path / "out.txt").write_text("o")
    digest = tables.fingerprint([source], {"deface": True})
    manifest = tables.Manifest(tmp_path, "stage", "sub-a")
    manifest.skip_if_current(digest, "done", "row")   # nothing recorded yet: no skip
    manifest.record(digest, ["out.txt"], row={"scan": "sub-a"})
    assert manifest.path == tmp_path / ".atlas-curate" / "stage" / "sub-a.json"
    with pytest.raises(Skip) as skip:
        manifest.skip_if_current(digest, "done", "row")
    assert skip.value.value == {"scan": "sub-a"}
    manifest.skip_if_current(digest, "done", "row", overwrite=True)      # --overwrite never skips
    assert tables.fingerprint([source], {"deface": False}) != digest     # other options
    source.write_text("ab")
    assert tables.fingerprint([source], {"deface": True}) != digest      # changed input
    (tmp_path / "out.txt").unlink()
    assert manifest.current(digest) is None                              # an output gone: redo
    manifest.path.write_text("{not json")
    assert manifest.current(digest) is None                              # a damaged record: redo


def test_fingerprint_counts_missing_files(tmp_path):
    assert tables.fingerprint([tmp_path / "missing"]) == tables.fingerprint([tmp_path / "missing"])
    assert tables.fingerprint([tmp_path / "missing"]) != tables.fingerprint([tmp_path / "other"])


# --- template grid --------------------------------------------------------------------------------------

def test_template_grid_is_cached_and_checks_grids(tmp_path):
    import nibabel as nib

    from atlas_curate import io

    grid = template_grid()
    assert grid is template_grid(naming.TEMPLATE_KEY)
    assert grid.space == naming.SPACE and grid.shape == tuple(registry()[naming.TEMPLATE_KEY]["shape"])
    assert grid.brain.shape == grid.shape and grid.brain.dtype == bool and not grid.brain.flags.writeable
    assert not grid.affine.flags.writeable and grid.voxel_mm3 == pytest.approx(1.0)
    img = grid.image(np.zeros(grid.shape), np.uint8)
    assert grid.problem(img) is None and int(img.header["sform_code"]) == 4
    grid.check(img, "ok.nii.gz")
    shifted = nib.Nifti1Image(np.zeros(grid.shape, np.uint8), grid.affine + np.diag([0, 0, 0, 0]) + 0.5)
    with pytest.raises(io.InputError, match=f"bad.nii.gz: lesion mask not on the {naming.SPACE} grid: affine"):
        grid.check(shifted, "bad.nii.gz", "lesion mask")
    small = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    assert "shape" in grid.problem(small)


def test_no_stage_spells_the_template_space_or_bids_version():
    """The space name, the BIDS version and the template key live in the spec and the registry only."""
    package = Path(naming.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith(("#", '"', "*"))]
        text = "\n".join(code)
        for literal in ('"mni2009"', '"1.10.0"'):
            if literal in text:
                offenders.append(f"{path.relative_to(package)}: {literal}")
    assert not offenders, offenders
    assert os.path.basename(naming.__file__) == "naming.py"
