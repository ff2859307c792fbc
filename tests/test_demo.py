"""The default demo end to end: every stage, the wall-time table, a network that learned, the index page last."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from atlas_curate.cli import main

STAGES = ("synth", "bids-convert", "normalize", "overlap-map", "split", "train-baseline", "evaluate", "predict")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(main, ["demo", str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_demo_runs_every_stage_and_ends_with_the_index_page(demo):
    out, output = demo
    for stage in STAGES:
        assert f"[demo] {stage} ..." in output, stage
        assert re.search(rf"^ +{stage} +\d+\.\d s$", output, re.M), f"no wall time for {stage}"
    index = out / "bids" / "derivatives" / "atlas-curate" / "index.html"
    assert output.strip().splitlines()[-1].endswith(str(index)) and index.is_file()
    # the training summary says what the dev Dice rests on, never a bare number
    line = next(x for x in output.splitlines() if "trained on" in x)
    assert re.search(r"dev Dice \d\.\d{3} on \d+ dev scans? \(lesions [\d., ]+ cm³\)", line), line


@pytest.mark.slow
def test_demo_network_learned(demo):
    out, _ = demo
    summary = json.loads((out / "run-demo" / "eval-test" / "summary.json").read_text())
    dsc = summary["metrics"]["dsc"]
    # an untrained network scores about 0.03 on these scans (benchmarks/bench_demo.py)
    assert dsc["n"] >= 2 and dsc["mean"] > 0.4, dsc
    predictions = (out / "predictions" / "predictions.tsv").read_text()
    assert "\tok\t" in predictions


@pytest.mark.slow
def test_demo_index_page_in_a_browser(demo, page):
    from test_pages import broken_refs  # tests/ is on sys.path under pytest

    out, _ = demo
    index = out / "bids" / "derivatives" / "atlas-curate" / "index.html"
    assert broken_refs(index) == []
    page.goto(index.as_uri())
    text = page.inner_text("body")
    assert "not run yet" not in text
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                                              "e.naturalWidth])")
    assert len(images) >= 5 and all(complete and width > 0 for _, complete, width in images), images
    assert page.failures == []
