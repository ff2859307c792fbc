"""The derivative's front page (``index.html``), its registry (``index.json``) and the training curve.

Verdict lines are checked against counts the test derives itself (the generator's ground truth, the files read
with the csv module), never against the module's own parsing. The browser test builds a real tree with every
stage (bids-convert, normalize of three subjects, overlap-map, split written outside the dataset, a micro
training run beside it, evaluate, predict), opens the page in headless Chromium and checks that every link
resolves, every image loads and nothing failed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pytest

from atlas_curate.index import (
    REGISTRY_FILE,
    conversion_verdict,
    overlap_verdict,
    qc_verdict,
    read_registry,
    refresh_index,
    register,
    run_verdict,
    write_index,
)
from atlas_curate.tables import as_bool

DERIVATIVE = Path("derivatives") / "atlas-curate"


# ------------------------------------------------------------------------------------------ helpers

class _Refs(HTMLParser):
    """Every a[href] and img[src] of a page, as written."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href") is not None:
            self.hrefs.append(attrs["href"])
        if tag == "img" and attrs.get("src") is not None:
            self.srcs.append(attrs["src"])


def refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser


def broken_refs(page: Path) -> list[str]:
    """Relative references of ``page`` that do not resolve to an existing file or an anchor of the page."""
    found = refs(page)
    broken = []
    for ref in found.hrefs + found.srcs:
        parts = urlsplit(ref)
        if parts.scheme or ref.startswith("/"):
            broken.append(f"{ref}: not relative")
        elif not parts.path:
            if parts.fragment not in found.ids:
                broken.append(f"{ref}: no such anchor")
        elif not (page.parent / unquote(parts.path)).exists():
            broken.append(f"{ref}: not found")
    return broken


def text_of(page: Path) -> str:
    """The page's text with tags removed and whitespace collapsed (what a reader sees)."""
    return " ".join(re.sub(r"<[^>]+>", " ", page.read_text()).split())


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def bids_root(tmp_path: Path, name: str = "bids") -> Path:
    root = tmp_path / name
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy set", "BIDSVersion": "1.10.0"}))
    return root


# ------------------------------------------------------------------------------------------ empty dataset

def test_empty_dataset_says_not_run_yet_with_commands(tmp_path):
    root = bids_root(tmp_path)
    page = write_index(root)
    assert page == root / DERIVATIVE / "index.html"
    text = text_of(page)
    assert "atlas-curate: toy set" in text
    for command in ("atlas-curate bids-convert RELEASE BIDS_ROOT", "atlas-curate normalize BIDS_ROOT",
                    "atlas-curate overlap-map BIDS_ROOT", "atlas-curate split BIDS_ROOT",
                    "atlas-curate train-baseline BIDS_ROOT --splits", "atlas-curate evaluate RUN_DIR",
                    "atlas-curate predict RUN_DIR"):
        assert f"not run yet: {command}" in text, command
    assert broken_refs(page) == []
    assert str(tmp_path) not in page.read_text()
    # the validator knows neither the page nor the registry: the derivative ignores both
    assert {"index.html", "index.json"} <= set((root / DERIVATIVE / ".bidsignore").read_text().splitlines())
    assert write_index(root).read_bytes() == page.read_bytes()           # same tree, same page


# ------------------------------------------------------------------------------------------ verdicts

def test_qc_verdict_counts_and_rater_decisions(tmp_path):
    qc = tmp_path / "qc.tsv"
    header = "scan\tstatus\tqc_pass\tqc_reasons\terror\n"
    rows = ("sub-a_ses-1\tok\tTrue\tn/a\tn/a\n" "sub-b_ses-1\tok\tTrue\tn/a\tn/a\n"
            "sub-c_ses-1\tok\tFalse\tncc_brain 0.41 < 0.6\tn/a\n" "sub-d_ses-1\tfailed\tFalse\tn/a\tboom\n")
    qc.write_text(header + rows)
    assert qc_verdict(qc) == ("4 scans: 2 passed QC, 1 flagged, 1 error", "warn")
    decided = ["include", "n/a", "exclude", "n/a"]
    lines = (header + rows).splitlines()
    qc.write_text("\n".join([lines[0] + "\thuman_decision"]
                            + [f"{line}\t{d}" for line, d in zip(lines[1:], decided)]) + "\n")
    text, _ = qc_verdict(qc)
    assert text == "4 scans: 2 passed QC, 1 flagged, 1 error; 2 decided by a rater (1 exclude, 1 include)"
    qc.write_text("scan\tstatus\tqc_pass\nsub-a_ses-1\tok\tTrue\n")
    assert qc_verdict(qc) == ("1 scan: 1 passed QC, 0 flagged, 0 errors", "ok")
    qc.write_text((header + rows).replace("\tTrue\t", "\ttrue\t").replace("\tFalse\t", "\tfalse\t"))
    assert qc_verdict(qc) == ("4 scans: 2 passed QC, 1 flagged, 1 error", "warn")   # as tables.write_tsv writes


@pytest.mark.parametrize("layout", ["scan is the release's name", "scan is the BIDS key, release_scan added"])
def test_conversion_report_of_either_layout(tmp_path, layout):
    """Reports written before ``release_scan`` existed (``scan`` = the release's name) read as the new ones do
    (``scan`` = the BIDS key, ``n/a`` for a metadata row without a scan): the page names the release's scan."""
    old = [("Site1/000001/t01", "converted", "n/a"), ("Site1/000002/t01", "failed", "truncated gzip"),
           ("Site2/000003/t01", "no_scan", "no scan folder")]
    keys = {"Site1/000001/t01": "sub-000001_ses-t01", "Site1/000002/t01": "sub-000002_ses-t01"}
    root = bids_root(tmp_path)
    if layout.startswith("scan is the release"):
        lines = ["scan\tstatus\treason"] + ["\t".join(row) for row in old]
    else:
        lines = ["scan\trelease_scan\tstatus\treason"] + [f"{keys.get(r[0], 'n/a')}\t" + "\t".join(r) for r in old]
    (root / "conversion_report.tsv").write_text("\n".join(lines) + "\n")
    expected = "2 scans: 1 converted, 1 failed; 1 metadata row without a scan folder"
    assert conversion_verdict(root / "conversion_report.tsv") == (expected, "warn")
    text = text_of(write_index(root))
    assert expected in text
    assert "failed Site1/000002/t01: truncated gzip" in text and "no_scan Site2/000003/t01: no scan folder" in text


def test_overlap_verdict(tmp_path):
    doc = {"NumberOfScans": {"included": 4, "excluded": 2, "excluded_by_category": {"qc-failed": 1, "missing": 1}},
           "MaximumFraction": 0.75, "Options": {"lesions": "all"}}
    path = tmp_path / "overlap.json"
    path.write_text(json.dumps(doc))
    assert overlap_verdict(path)[0] == ("overlap of 4 scans (2 excluded: 1 missing, 1 qc-failed), "
                                        "max overlap 0.750 (3 of 4 scans); lesions: all")


def _run_folder(path: Path, *, status: str, dev: list[str], log_rows: list[tuple]) -> Path:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"status": status, "train_scans": ["a", "b", "c"], "dev_scans": dev,
                                               "preset": "quick", "fold": None, "bids_root": "x"}))
    (path / "config.toml").write_text('preset = "quick"\n[[stages]]\nname = "zoom_in"\nepochs = 3\n'
                                      '[[stages]]\nname = "zoom_out"\nepochs = 2\n')
    lines = ["stage\tepoch\ttrain_loss\tbce\tdice_loss\tlr\tdev_dice\tseconds"]
    lines += ["\t".join(map(str, row)) for row in log_rows]
    (path / "log.tsv").write_text("\n".join(lines) + "\n")
    return path


LOG = [("zoom_in", 1, 0.9, 0.5, 0.95, 0.003, "n/a", 1.0), ("zoom_in", 2, 0.8, 0.4, 0.85, 0.002, "n/a", 1.0),
       ("zoom_in", 3, 0.7, 0.3, 0.75, 0.001, 0.25, 1.0), ("zoom_out", 1, 0.6, 0.2, 0.65, 0.001, "n/a", 1.0),
       ("zoom_out", 2, 0.5, 0.1, 0.55, 0.0005, 0.4125, 1.0)]


def test_run_verdict_complete_and_stopped(tmp_path):
    done = _run_folder(tmp_path / "done", status="complete", dev=["d"], log_rows=LOG)
    assert run_verdict(done) == ("trained 5 epochs on 3 scans; last dev Dice 0.412 (dev set 1 scan); preset quick",
                                 "ok")
    stopped = _run_folder(tmp_path / "stopped", status="stopped", dev=[], log_rows=LOG[:2])
    text, status = run_verdict(stopped)
    assert status == "warn"
    assert text.startswith("stopped after 2 of 5 epochs on 3 scans (train-baseline --resume continues it)")
    assert "last dev Dice n/a (dev set 0 scans)" in text


# ------------------------------------------------------------------------------------------ registry

def test_registry_relative_no_duplicates_and_missing_entries(tmp_path):
    root = bids_root(tmp_path)
    run = _run_folder(tmp_path / "runs" / "run one", status="complete", dev=["d"], log_rows=LOG)
    predictions = tmp_path / "pred"
    predictions.mkdir()
    (predictions / "m.nii.gz").write_bytes(b"x")
    (predictions / "predictions.tsv").write_text("input\tstatus\tmask\terror\nt1.nii.gz\tok\tm.nii.gz\tn/a\n"
                                                 "t2.nii.gz\tfailed\tn/a\tunreadable\n")
    page = register(root, "run", run)
    assert page == root / DERIVATIVE / "index.html"
    register(root, "run", tmp_path / "runs" / "x" / ".." / "run one")    # same folder, other spelling
    register(root, "predictions", predictions)
    register(root, "run", run)
    doc = json.loads((root / DERIVATIVE / REGISTRY_FILE).read_text())
    assert doc["run"] == ["../../../runs/run one"] and doc["predictions"] == ["../../../pred"]
    assert read_registry(root)["split"] == []
    with pytest.raises(ValueError, match="kind must be one of"):
        register(root, "model", run)

    found = refs(page)
    assert "../../../runs/run%20one/log.tsv" in found.hrefs and "../../../pred/m.nii.gz" in found.hrefs
    assert "../../../runs/run%20one/config.toml" in found.hrefs
    assert broken_refs(page) == []
    text = text_of(page)
    assert "trained 5 epochs on 3 scans; last dev Dice 0.412 (dev set 1 scan)" in text
    assert "2 inputs: 1 segmented, 1 failed" in text
    assert "no run evaluated yet: atlas-curate evaluate RUN_DIR" in text

    (predictions / "predictions.tsv").unlink()
    (predictions / "m.nii.gz").unlink()
    predictions.rmdir()
    page = write_index(root)
    assert "../pred: registered predictions folder not found (moved or deleted)" in text_of(page)
    assert broken_refs(page) == []


def test_a_page_that_cannot_be_written_never_fails_the_stage(tmp_path, caplog):
    root = bids_root(tmp_path)
    (root / "derivatives").write_text("a file where the derivative folder should be")
    with caplog.at_level(logging.WARNING, logger="atlas_curate.index"):
        assert refresh_index(root) is None
        assert refresh_index(root, "run", tmp_path) is None
    assert sum("could not update" in r.getMessage() for r in caplog.records) == 2
    assert refresh_index(None, "predictions", tmp_path) is None          # no BIDS root known: nothing to do

    broken = bids_root(tmp_path, "broken")
    (broken / DERIVATIVE).mkdir(parents=True)
    (broken / DERIVATIVE / REGISTRY_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="atlas_curate.index"):
        assert refresh_index(broken, "run", tmp_path) is None
    assert "index.json" in caplog.records[-1].getMessage()


def test_an_unreadable_output_is_reported_not_fatal(tmp_path):
    root = bids_root(tmp_path)
    (root / "conversion_report.tsv").write_text("no status column here\n1\n")
    (root / DERIVATIVE / "overlap").mkdir(parents=True)
    (root / DERIVATIVE / "overlap" / "overlap.json").write_text("[1, 2")
    text = text_of(write_index(root))
    assert "could not be read: KeyError" in text and "could not be read: JSONDecodeError" in text
    assert "not run yet: atlas-curate normalize BIDS_ROOT" in text


# ------------------------------------------------------------------------------------------ training curve

def test_training_curve_is_deterministic_and_leaves_matplotlib_alone(tmp_path):
    import matplotlib
    from matplotlib.image import imread

    torch = pytest.importorskip("torch")  # noqa: F841 - atlas_curate.train imports torch
    from atlas_curate.train.curve import training_curve

    run = _run_folder(tmp_path / "run", status="complete", dev=["d"], log_rows=LOG)
    backend = matplotlib.get_backend()
    figures = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []
    png = training_curve(run / "log.tsv", run / "curve.png")
    assert png == run / "curve.png"
    first = png.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in first and b"matplotlib" not in first
    assert training_curve(run / "log.tsv", tmp_path / "again.png").read_bytes() == first
    assert imread(png).shape[:2] == (380, 750)
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == figures
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []     # no temporary file left

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.tsv").write_text("stage\tepoch\ttrain_loss\tbce\tdice_loss\tlr\tdev_dice\tseconds\n")
    assert imread(training_curve(empty / "log.tsv", empty / "curve.png")).shape[:2] == (380, 750)


# ------------------------------------------------------------------------------------------ real outputs

@pytest.fixture(scope="module")
def converted(native_release, tmp_path_factory):
    from atlas_curate.convert import convert

    base = tmp_path_factory.mktemp("pages")
    convert(native_release.root, base / "bids", jobs=2, progress=False)
    return base, base / "bids", native_release


def test_conversion_verdict_and_page_after_a_real_convert(converted):
    _, root, release = converted
    faults = release.truth["faults"]
    scans = set(release.truth["scans"]) | set(faults)
    kinds = list(faults.values())
    n_scans = len(scans) - kinds.count("row_without_folder")
    n_converted = len([s for s in scans if s not in faults]) + kinds.count("folder_without_row")
    withheld = kinds.count("mask_grid") + kinds.count("empty_mask")
    expected = (f"{n_scans} scans: {n_converted} converted, {withheld} masks withheld, "
                f"{kinds.count('truncated_gzip')} failed; {kinds.count('row_without_folder')} metadata row"
                f"{'s' if kinds.count('row_without_folder') != 1 else ''} without a scan folder")
    assert conversion_verdict(root / "conversion_report.tsv") == (expected, "warn")
    # the report itself, read with the csv module, agrees
    rows = read_tsv(root / "conversion_report.tsv")
    assert sum(r["status"] == "converted" for r in rows) == n_converted

    page = root / DERIVATIVE / "index.html"          # written by bids-convert itself
    assert page.is_file() and not (root / DERIVATIVE / REGISTRY_FILE).exists()
    text = text_of(page)
    assert expected in text and "not run yet: atlas-curate normalize BIDS_ROOT" in text
    failed = next(r for r in rows if r["status"] == "failed")
    assert f"failed {failed['release_scan']}: {failed['reason']}" in text   # the release's name of the scan
    assert "../../conversion_report.tsv" in refs(page).hrefs and broken_refs(page) == []


@pytest.fixture(scope="module")
def pipeline(converted):
    """Every stage on the converted release: normalize (three single-session subjects), overlap-map, a 1/1/1
    split written outside the dataset, a micro training run and its evaluation beside it, one prediction."""
    pytest.importorskip("torch")
    from test_train import MICRO  # tests/ is on sys.path under pytest

    from atlas_curate.evaluate import evaluate
    from atlas_curate.normalize import normalize
    from atlas_curate.overlap import overlap_map
    from atlas_curate.predict import predict
    from atlas_curate.split import make_split, write_split
    from atlas_curate.train import train

    base, root, release = converted
    faults = release.truth["faults"]
    by_subject: dict[str, list[str]] = {}
    for key in sorted(set(release.truth["scans"]) | set(faults)):      # release IDs: c0001s0001t01
        by_subject.setdefault(key[:10], []).append(key)
    chosen = [s for s, keys in sorted(by_subject.items()) if len(keys) == 1 and keys[0] not in faults][:3]
    assert len(chosen) == 3, by_subject
    normalized = normalize(root, participant_labels=chosen, jobs=2, progress=False)
    overlap = overlap_map(root, include_failed=True, jobs=2, progress=False)
    table = make_split(root, seed=0, fractions=(0.34, 0.33, 0.33), include_failed=True, progress=False)
    split_tsv, _ = write_split(table, base / "elsewhere" / "split.tsv")
    run = base / "run-micro"
    trained = train(root, split_tsv, run, config=MICRO, device="cpu", progress=False)
    scored = evaluate(run, device="cpu", progress=False, n_resamples=200)
    test_scan = table.loc[table["split"] == "test", "t1"].iloc[0]
    predicted = predict(run, [test_scan], base / "predictions", progress=False)
    return {"base": base, "root": root, "normalized": normalized, "overlap": overlap, "split": split_tsv,
            "table": table, "run": run, "trained": trained, "scored": scored, "predicted": predicted}


@pytest.mark.slow
def test_every_link_and_image_of_a_real_tree_in_a_browser(pipeline, page):
    root, base, run = pipeline["root"], pipeline["base"], pipeline["run"]
    index_html = root / DERIVATIVE / "index.html"
    registry = read_registry(root)
    assert registry["split"] == ["../../../elsewhere/split.tsv"]
    assert registry["run"] == ["../../../run-micro"] and registry["predictions"] == ["../../../predictions"]
    assert registry["overlap"] == ["overlap"]
    html = index_html.read_text()
    assert str(base) not in html                        # nothing absolute: the tree can move

    # verdict lines against the files, read here
    text = text_of(index_html)
    qc = read_tsv(root / DERIVATIVE / "qc.tsv")
    passed = sum(as_bool(r["qc_pass"]) is True and r["status"] != "failed" for r in qc)
    assert f"{len(qc)} scans: {passed} passed QC" in text
    overlap_doc = json.loads((root / DERIVATIVE / "overlap" / "overlap.json").read_text())
    assert f"overlap of {len(overlap_doc['Included'])} scans" in text
    split_rows = read_tsv(pipeline["split"])
    counts = {s: sum(r["split"] == s for r in split_rows) for s in ("train", "dev", "test")}
    assert counts == {"train": 1, "dev": 1, "test": 1}
    assert "3 scans split: 1 train, 1 dev, 1 test" in text
    assert re.search(r"<th[^>]*>scans</th>", html) and ">Q1</th>" in html      # the balance table
    log_rows = read_tsv(run / "log.tsv")
    dice = [float(r["dev_dice"]) for r in log_rows if r["dev_dice"] != "n/a"][-1]
    assert f"trained {len(log_rows)} epochs on 1 scan; last dev Dice {dice:.3f} (dev set 1 scan)" in text
    summary = json.loads((run / "eval-test" / "summary.json").read_text())
    assert f"test DSC mean {summary['metrics']['dsc']['mean']:.3f}" in text and "over 1 scan;" in text
    assert "1 input: 1 segmented, 0 failed" in text
    assert "not run yet" not in text
    assert (run / "curve.png").is_file()

    page.goto(index_html.as_uri())
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => [e.getAttribute('href'), e.href])")
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                                              "e.naturalWidth])")
    assert len(images) == 5, images      # 3 overlap figures, the training curve, DSC vs volume
    assert [src for src, complete, width in images if not (complete and width > 0)] == []
    wanted = {"../../conversion_report.tsv", "report.html", "qc.tsv", "overlap/table1.tsv", "overlap/table2.tsv",
              "overlap/lesions.tsv", "overlap/disagreements.tsv", "overlap/overlap.json",
              "../../../elsewhere/split.tsv", "../../../run-micro/config.toml", "../../../run-micro/log.tsv",
              "../../../run-micro/curve.png", "../../../run-micro/model.pt", "../../../run-micro/eval-test/summary.tsv",
              "../../../run-micro/eval-test/scans.tsv", "../../../run-micro/eval-test/by_cohort.tsv",
              "../../../run-micro/eval-test/by_size_quartile.tsv", "../../../run-micro/eval-test/summary.json",
              "../../../predictions/predictions.tsv"}
    written = {raw for raw, _ in hrefs}
    assert wanted <= written, sorted(wanted - written)
    for raw, resolved in hrefs:
        parts = urlsplit(resolved)
        assert parts.scheme == "file" and not urlsplit(raw).scheme, raw
        if parts.path == urlsplit(page.url).path:
            assert page.locator(f"#{parts.fragment}").count() == 1, raw
        else:
            assert Path(url2pathname(parts.path)).exists(), raw
    for target in ("report.html", "overlap/overlap_glass.png", "../../../run-micro/curve.png"):
        response = page.goto((index_html.parent / target).resolve().as_uri())
        assert response is not None and response.ok, target
    assert page.failures == []

    # moved as a whole (as a zip of the tree would be), the page still resolves every reference
    moved = base.with_name(base.name + "-moved")
    os.rename(base, moved)
    try:
        assert broken_refs(moved / "bids" / DERIVATIVE / "index.html") == []
    finally:
        os.rename(moved, base)
