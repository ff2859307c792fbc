"""A rater's QC decisions: the report's controls, ``qc-apply`` and the stages that follow them.

Fast tests check the decisions file and ``qc.tsv`` handling on a ``qc.tsv`` written the way normalize writes
it (pandas, ``n/a`` for missing values). The others use a real normalized dataset: a synthetic standard-space
release (normalize runs in full but registration is skipped, to keep the module at about a minute), with one
scan made to fail automatic QC (its T1 replaced by shuffled intensities) and one made to fail normalisation
(a truncated T1).
"""

from __future__ import annotations

import csv
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from atlas_curate import io, tables
from atlas_curate.cli import main
from atlas_curate.convert import convert
from atlas_curate.dataset import scan_table
from atlas_curate.normalize import normalize
from atlas_curate.normalize.pipeline import QC_COLUMNS
from atlas_curate.qc_decisions import HUMAN_COLUMNS, DecisionsError, apply_decisions, read_decisions
from atlas_curate.split import make_split, write_split
from atlas_curate.synth import synthesize

SPACE = "MNI152NLin2009aSym"
NOW = datetime(2026, 12, 6, 8, 30, tzinfo=timezone.utc)
STAMP = "2026-12-06T08:30:00Z"
HEADER = "scan\tdecision\trater\tnote\n"


def write_decisions(path: Path, *rows: str, header: str = HEADER) -> Path:
    path.write_text(header + "".join(row + "\n" for row in rows))
    return path


def qc_file(root: Path) -> Path:
    return root / "derivatives" / "atlas-curate" / "qc.tsv"


def records(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# --- a qc.tsv as normalize writes it -----------------------------------------------------------------------

FAKE_SCANS = {  # scan: (status, qc_pass, reasons, error)
    "sub-01_ses-1": ("ok", True, "", None),
    "sub-02_ses-1": ("ok", False, "ncc_brain 0.31 < 0.5; shear 0.21 > 0.15", None),
    "sub-03_ses-1": ("failed", False, None, 'InputError: "sub-03_ses-1_T1w.nii.gz":\tcorrupt gzip'),
    "sub-04_ses-1": ("ok", True, "", None),
}


@pytest.fixture(params=["True/False", "true/false"])
def fake(tmp_path, request) -> Path:
    """A BIDS root holding only ``qc.tsv`` (every column of normalize's, an error with a quote and a tab), with
    ``qc_pass`` as earlier versions wrote it (True/False) and as tables.write_tsv does (true/false)."""
    root = tmp_path / "bids"
    rows = [{"scan": scan, "participant_id": scan.split("_")[0], "session_id": scan.split("_")[1], "space_in": "orig",
             "status": status, "qc_pass": passed, "qc_reasons": reasons, "error": error,
             **({"ncc_brain": 0.61234, "brain_coverage": 1.0, "scale_min": 0.98, "scale_max": 1.02,
                 "figure": f"{scan.split('_')[0]}/figures/{scan}_desc-normalize_T1w.png"} if status == "ok" else {})}
            for scan, (status, passed, reasons, error) in FAKE_SCANS.items()]
    table = pd.DataFrame(rows).reindex(columns=QC_COLUMNS)
    if request.param == "true/false":
        tables.write_tsv(table, qc_file(root))
        assert "\ttrue\t" in qc_file(root).read_text()
    else:
        io.write_text(table.to_csv(sep="\t", index=False, na_rep="n/a"), qc_file(root))
    return root


def test_decisions_are_recorded_beside_the_automatic_columns_byte_for_byte(fake, tmp_path):
    before = qc_file(fake).read_bytes()
    decisions = write_decisions(tmp_path / "d.tsv", "sub-01_ses-1\texclude\tA. Rater\tghosting over the lesion",
                                "sub-02_ses-1\tinclude\tA. Rater\t")
    result = apply_decisions(decisions, fake, now=NOW)
    after = qc_file(fake).read_bytes()
    old_lines, new_lines = before.decode().split("\n"), after.decode().split("\n")
    assert len(old_lines) == len(new_lines)
    for old, new in zip(old_lines, new_lines):
        if old:   # every line is the old line, byte for byte, plus four tab-free fields
            assert new.startswith(old + "\t") and new[len(old) + 1:].count("\t") == 3, (old, new)
    assert new_lines[0].split("\t")[-4:] == HUMAN_COLUMNS
    table = {r["scan"]: r for r in records(qc_file(fake))}
    assert [table["sub-01_ses-1"][c] for c in HUMAN_COLUMNS] == ["exclude", "A. Rater", STAMP,
                                                                  "ghosting over the lesion"]
    assert [table["sub-02_ses-1"][c] for c in HUMAN_COLUMNS] == ["include", "A. Rater", STAMP, "n/a"]
    assert [table["sub-04_ses-1"][c] for c in HUMAN_COLUMNS] == ["n/a"] * 4
    assert sorted(result.overruled) == ["sub-01_ses-1", "sub-02_ses-1"]
    summary = result.summary()
    assert "2 decisions applied: 1 include, 1 exclude" in summary
    assert "exclude sub-01_ses-1 (automatic QC passed" in summary and "include sub-02_ses-1" in summary
    html = (fake / "derivatives" / "atlas-curate" / "report.html").read_text()
    assert "excluded by A. Rater" in html and "ghosting over the lesion" in html


def test_applying_again_replaces_listed_scans_and_keeps_the_others(fake, tmp_path):
    apply_decisions(write_decisions(tmp_path / "a.tsv", "sub-01_ses-1\texclude\tA\tblurred",
                                    "sub-04_ses-1\texclude\tA\tmotion"), fake, now=NOW)
    later = NOW + timedelta(hours=1)
    result = apply_decisions(write_decisions(tmp_path / "b.tsv", "sub-01_ses-1\tinclude\tB\tfine after all",
                                             "sub-04_ses-1\texclude\tA\tmotion"), fake, now=later)
    table = {r["scan"]: r for r in records(qc_file(fake))}
    assert [table["sub-01_ses-1"][c] for c in HUMAN_COLUMNS] == ["include", "B", "2026-12-06T09:30:00Z",
                                                                  "fine after all"]
    # the same decision, rater and note as on record: kept as it was, time included
    assert [table["sub-04_ses-1"][c] for c in HUMAN_COLUMNS] == ["exclude", "A", STAMP, "motion"]
    assert result.unchanged == ["sub-04_ses-1"] and result.overruled == ["sub-04_ses-1"]
    # applying a file twice changes nothing the second time
    once = qc_file(fake).read_bytes()
    apply_decisions(tmp_path / "b.tsv", fake, now=later + timedelta(days=1))
    assert qc_file(fake).read_bytes() == once


def test_time_is_utc_and_a_header_only_file_adds_no_columns(fake, tmp_path):
    before = qc_file(fake).read_bytes()
    apply_decisions(write_decisions(tmp_path / "empty.tsv"), fake, now=NOW)
    assert qc_file(fake).read_bytes() == before
    paris = timezone(timedelta(hours=1))
    apply_decisions(write_decisions(tmp_path / "d.tsv", "sub-01_ses-1\texclude\tA\t"), fake,
                    now=datetime(2026, 12, 6, 9, 30, tzinfo=paris))
    assert records(qc_file(fake))[0]["human_time"] == STAMP


@pytest.mark.parametrize("header, row, reason", [
    ("scan\tdecision\tnote\n", "sub-01_ses-1\texclude\tx", "line 1: missing column rater"),
    (HEADER, "sub-01_ses-1\tmaybe\tA\tx", "line 2: sub-01_ses-1: decision 'maybe' is not include or exclude"),
    (HEADER, "sub-01_ses-1\texclude\t \tx", "line 2: sub-01_ses-1: empty rater"),
    (HEADER, "sub-99_ses-1\texclude\tA\tx", "line 2: sub-99_ses-1 is not in "),
    (HEADER, "sub-03_ses-1\texclude\tA\tx", "line 2: sub-03_ses-1: its normalisation failed, there is no output"),
    (HEADER, "sub-01_ses-1", "line 2: 1 fields"),
])
def test_a_bad_file_is_one_error_naming_file_line_and_reason_and_writes_nothing(fake, tmp_path, header, row,
                                                                                  reason):
    decisions = write_decisions(tmp_path / "qc_decisions.tsv", row, header=header)
    before = qc_file(fake).read_bytes()
    with pytest.raises(DecisionsError) as caught:
        apply_decisions(decisions, fake, now=NOW)
    message = str(caught.value)
    assert message.startswith(f"{decisions}: ") and reason in message and "nothing applied" in message
    assert qc_file(fake).read_bytes() == before
    assert not (fake / "derivatives" / "atlas-curate" / "report.html").exists()


def test_every_problem_is_listed_and_a_repeated_decision_must_agree(fake, tmp_path):
    decisions = write_decisions(tmp_path / "d.tsv", "sub-01_ses-1\texclude\tA\tx", "sub-99_ses-1\texclude\tA\t",
                                "sub-01_ses-1\tinclude\tA\t", "sub-04_ses-1\tINCLUDE\tA\tfirst",
                                "sub-04_ses-1\tinclude\tB\tsecond")
    with pytest.raises(DecisionsError) as caught:
        apply_decisions(decisions, fake, now=NOW)
    assert [line for line, _ in caught.value.problems] == [3, 4]
    assert "sub-01_ses-1 is listed twice with different decisions (exclude on line 2, include here)" in str(
        caught.value)
    # the same decision twice is fine: the last row wins; decisions are case-insensitive
    ok = write_decisions(tmp_path / "ok.tsv", "sub-04_ses-1\tINCLUDE\tA\tfirst", "sub-04_ses-1\tinclude\tB\tsecond")
    assert [(d.decision, d.rater, d.note) for d in read_decisions(ok)] == [("include", "B", "second")]


def test_cli_error_is_one_line_and_exit_status_2(fake, tmp_path, monkeypatch, capsys):
    from atlas_curate.cli import run

    decisions = write_decisions(tmp_path / "d.tsv", "sub-01_ses-1\tdrop\tA\t")
    monkeypatch.setattr("sys.argv", ["atlas-curate", "qc-apply", str(decisions), str(fake)])
    with pytest.raises(SystemExit) as caught:
        run()
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {decisions}: line 2: sub-01_ses-1: decision 'drop'")


# --- a real normalized dataset --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(bids root, scans): normalize output of 4 standard-space scans: ``passing`` (2 scans of which the
    first is used), ``qc_failed`` and ``errored``."""
    base = tmp_path_factory.mktemp("qcd")
    synthesize(base / "release", subjects=3, seed=4, flavour="standard", truth=base / "truth", jobs=2,
               progress=False)
    convert(base / "release", base / "bids", jobs=2, progress=False)
    bids = base / "bids"
    t1s = sorted(bids.rglob(f"*_space-{SPACE}_T1w.nii.gz"))
    assert len(t1s) == 4, t1s
    scans = [p.name.split("_space-")[0] for p in t1s]
    img = nib.load(t1s[1])
    noise = np.random.default_rng(0).permutation(np.asarray(img.dataobj).ravel()).reshape(img.shape)
    nib.save(nib.Nifti1Image(noise.astype(np.float32), img.affine, img.header), t1s[1])
    data = t1s[3].read_bytes()
    t1s[3].write_bytes(data[: len(data) // 2])
    result = normalize(bids, jobs=2, progress=False)
    qc = result.qc.set_index("scan")
    assert qc.loc[scans[0], "qc_pass"] and qc.loc[scans[2], "qc_pass"]
    assert not qc.loc[scans[1], "qc_pass"] and qc.loc[scans[1], "status"] == "ok"
    assert qc.loc[scans[3], "status"] == "failed"
    return bids, {"passing": scans[0], "other": scans[2], "qc_failed": scans[1], "errored": scans[3]}


def copy_of(dataset, tmp_path) -> tuple[Path, dict]:
    bids, scans = dataset
    return Path(shutil.copytree(bids, tmp_path / "bids")), scans


@pytest.mark.slow
def test_normalize_without_decisions_writes_no_human_columns(dataset):
    bids, _ = dataset
    assert qc_file(bids).read_text().split("\n", 1)[0].split("\t") == QC_COLUMNS


@pytest.mark.slow
def test_scan_table_follows_the_rater_both_ways(dataset, tmp_path):
    bids, scans = copy_of(dataset, tmp_path)
    before = scan_table(bids).set_index("scan")
    assert (before["qc_decision"] == "").all()
    assert before.loc[scans["qc_failed"], "excluded"].startswith("qc failed: ")
    apply_decisions(write_decisions(tmp_path / "d.tsv", f"{scans['passing']}\texclude\tA. Rater\tghosting",
                                    f"{scans['qc_failed']}\tinclude\tA. Rater\tchecked by eye"), bids, now=NOW)
    for include_failed in (False, True):
        table = scan_table(bids, include_failed=include_failed).set_index("scan")
        assert table.loc[scans["passing"], "excluded"] == "excluded by rater A. Rater: ghosting"
        assert table.loc[scans["passing"], "qc_decision"] == "exclude"
        assert table.loc[scans["qc_failed"], "excluded"] == ""
        assert table.loc[scans["qc_failed"], "qc_decision"] == "include"
        assert not table.loc[scans["qc_failed"], "qc_pass"]   # the automatic verdict is still there
        # no decision: as before
        for scan in (scans["other"], scans["errored"]):
            assert table.loc[scan, "qc_decision"] == ""
            assert table.loc[scan, "excluded"] == scan_table(dataset[0], include_failed=include_failed).set_index(
                "scan").loc[scan, "excluded"]
    split = make_split(bids, seed=0).set_index("scan")
    assert split.loc[scans["passing"], "split"] == "excluded"
    assert split.loc[scans["qc_failed"], "split"] in ("train", "dev", "test")


@pytest.mark.slow
def test_normalize_reruns_keep_the_decisions(dataset, tmp_path):
    bids, scans = copy_of(dataset, tmp_path)
    apply_decisions(write_decisions(tmp_path / "d.tsv", f"{scans['passing']}\texclude\tA\tghosting",
                                    f"{scans['qc_failed']}\tinclude\tB\t"), bids, now=NOW)
    recorded = qc_file(bids).read_bytes()
    # a copied dataset's manifests name other paths: the subject is normalised again, the others kept as rows
    subject = scans["passing"].split("_")[0]
    again = normalize(bids, participant_labels=[subject], progress=False)
    assert again.skipped == 0
    assert qc_file(bids).read_bytes() == recorded
    before = records(qc_file(bids))
    everything = normalize(bids, jobs=2, progress=False)    # now every scan is written anew
    after = records(qc_file(bids))
    # the same table; only the error message of the scan that fails names the copy's path now
    assert [{k: v for k, v in r.items() if k != "error"} for r in after] == [
        {k: v for k, v in r.items() if k != "error"} for r in before]
    assert {r["scan"]: r["human_decision"] for r in after} == {
        scans["passing"]: "exclude", scans["qc_failed"]: "include", scans["other"]: "n/a", scans["errored"]: "n/a"}
    assert "excluded by A" in everything.report.read_text()
    assert list(everything.qc.columns) == QC_COLUMNS + HUMAN_COLUMNS


@pytest.mark.slow
def test_report_decisions_download_apply_and_split(dataset, tmp_path, page):
    bids, scans = copy_of(dataset, tmp_path)
    report = bids / "derivatives" / "atlas-curate" / "report.html"
    passing, failed = scans["passing"], scans["qc_failed"]
    page.goto(report.as_uri())
    # everything the page showed before is still there
    for scan in scans.values():
        assert page.locator(f"h2[id='{scan}']").count() == 1
    assert page.locator("img").count() == 3
    assert page.locator(f"select[data-scan='{scans['errored']}']").count() == 0   # nothing to decide
    assert page.get_by_label(f"Decision for {passing}").input_value() == ""        # automatic by default

    page.select_option(f"select[data-scan='{passing}']", "exclude")
    page.click("#qc-download")   # no rater yet: nothing is downloaded, the page says why
    assert "rater" in page.locator("#qc-status").inner_text()
    page.get_by_label("Rater").fill("Test Rater")
    page.fill(f"input.qc-note[data-scan='{passing}']", "ghosting\tover the lesion")
    page.select_option(f"select[data-scan='{failed}']", "include")
    with page.expect_download() as download:
        page.click("#qc-download")
    assert download.value.suggested_filename == "qc_decisions.tsv"
    saved = tmp_path / "qc_decisions.tsv"
    download.value.save_as(saved)
    assert saved.read_text() == (HEADER + f"{passing}\texclude\tTest Rater\tghosting over the lesion\n"
                                 f"{failed}\tinclude\tTest Rater\t\n")

    result = CliRunner().invoke(main, ["qc-apply", str(saved), str(bids)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "2 decisions applied: 1 include, 1 exclude" in result.output
    assert f"exclude {passing} (automatic QC passed; Test Rater: ghosting over the lesion)" in result.output

    table = make_split(bids, seed=0)
    tsv, _ = write_split(table, bids / "derivatives" / "atlas-curate" / "split.tsv")
    rows = pd.read_csv(tsv, sep="\t", keep_default_na=False).set_index("scan")
    assert rows.loc[passing, "split"] == "excluded"
    assert rows.loc[passing, "excluded"] == "excluded by rater Test Rater: ghosting over the lesion"
    assert rows.loc[failed, "split"] in ("train", "dev", "test")

    # the page shows the decisions on record; one kept as it was keeps its rater when downloaded again
    page.goto(report.as_uri())
    assert page.locator(f"select[data-scan='{passing}']").input_value() == "exclude"
    assert page.locator(f"input.qc-note[data-scan='{passing}']").input_value() == "ghosting over the lesion"
    assert page.locator(f"select[data-scan='{failed}']").input_value() == "include"
    assert "excluded by Test Rater" in page.locator(f"h2[id='{passing}']").inner_text()
    page.get_by_label("Rater").fill("Second Rater")
    page.select_option(f"select[data-scan='{failed}']", "exclude")
    with page.expect_download() as download:
        page.click("#qc-download")
    download.value.save_as(tmp_path / "again.tsv")
    assert (tmp_path / "again.tsv").read_text() == (HEADER
                                                    + f"{passing}\texclude\tTest Rater\tghosting over the lesion\n"
                                                    f"{failed}\texclude\tSecond Rater\t\n")
    assert page.failures == []
