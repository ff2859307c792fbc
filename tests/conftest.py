"""Shared fixtures: synthetic releases built once per test session (the generator is the product's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas_curate.synth import synthesize

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def shared_fixture(*parts: str) -> Path:
    """Path to a real fixture in ../shared/fixtures, or skip the test with the reason."""
    path = SHARED_FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real fixture not available: {path} (../shared/fixtures is absent)")
    return path


class Release:
    def __init__(self, root: Path, truth_dir: Path):
        self.root = root
        self.truth_dir = truth_dir
        self.truth = json.loads((truth_dir / "truth.json").read_text())


@pytest.fixture(scope="session")
def native_release(tmp_path_factory) -> Release:
    """4 subjects over 4 cohorts (one with a second session, one primary override) + 5 fault scans."""
    base = tmp_path_factory.mktemp("native")
    synthesize(base / "release", subjects=4, seed=3, flavour="native", faults=True, truth=base / "truth",
               jobs=2, progress=False)
    return Release(base / "release", base / "truth")


@pytest.fixture(scope="session")
def standard_release(tmp_path_factory) -> Release:
    """3 subjects in the FCP-INDI standard-space layout + 5 fault scans."""
    base = tmp_path_factory.mktemp("standard")
    synthesize(base / "release", subjects=3, seed=5, flavour="standard", faults=True, truth=base / "truth",
               jobs=2, progress=False)
    return Release(base / "release", base / "truth")


@pytest.fixture(scope="session")
def atlas2_release(tmp_path_factory) -> Release:
    """6 subjects in the ATLAS R2.0 layout (4 training, 2 testing, 4 cohorts) + 5 fault scans."""
    base = tmp_path_factory.mktemp("atlas2")
    synthesize(base / "release", subjects=6, seed=2, flavour="atlas2", faults=True, truth=base / "truth",
               jobs=2, progress=False)
    return Release(base / "release", base / "truth")


def _chromium() -> str | None:
    import os
    import shutil

    explicit = os.environ.get("ATLAS_CURATE_BROWSER")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by Playwright (the OS's Chromium: nothing is downloaded), or a skip naming
    what is missing. ``make test`` installs Chromium (scripts/install-browser.sh)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need playwright (pip install -e '.[test]')")
    executable = _chromium()
    if executable is None:
        pytest.skip("browser tests need Chromium: run scripts/install-browser.sh or set ATLAS_CURATE_BROWSER")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True,
                                      args=["--no-sandbox", "--allow-file-access-from-files"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser page that records failed requests and console errors (``page.failures``)."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.failures = []
    page.on("requestfailed", lambda request: page.failures.append(f"{request.url}: {request.failure}"))
    page.on("console", lambda msg: page.failures.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" else None)
    page.on("pageerror", lambda exc: page.failures.append(f"page error: {exc}"))
    yield page
    context.close()
