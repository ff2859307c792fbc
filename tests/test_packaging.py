"""The package installs and finds its data files in every install mode: a wheel in a fresh venv,
``pip install --user``, ``--prefix`` and ``--target``; each install runs ``synth`` and ``bids-convert``.

The installs take ``--no-deps`` and borrow the test environment's dependencies (numpy, antspyx, ...), so the
test needs no package index beyond the build backend; what is checked is that atlas-curate itself, its
``templates/`` and ``metadata/`` come from the install under test and not from this checkout.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPS = sysconfig.get_paths()["purelib"]      # the test environment's site-packages (the dependencies)

PROBE = ("import atlas_curate, sys; from atlas_curate.resources import data_dir; "
         "print(atlas_curate.__file__); print(data_dir('templates')); print(data_dir('metadata'))")


@pytest.fixture(autouse=True, scope="module")
def _environment_keeps_its_install():
    """No install here may touch the test environment's own atlas-curate (its console script included)."""
    script = Path(sys.executable).with_name("atlas-curate")
    before = script.exists()
    yield
    assert script.exists() == before, f"{script} was removed by an install in these tests"


def test_every_subpackage_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "atlas_curate").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    found |= {"atlas_curate.data.templates", "atlas_curate.data.metadata"}
    assert found == listed


def _run(args, env=None, cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)])
    found = sorted(out.glob("atlas_curate-*.whl"))
    assert found, "no wheel built"
    return found[0]


def _check_install(python: str, env: dict, where: Path, tmp: Path) -> None:
    """atlas-curate and its data come from ``where``; synth and bids-convert run from there."""
    env = {**env, "PYTHONNOUSERSITE": env.get("PYTHONNOUSERSITE", "1")}
    lines = _run([python, "-c", PROBE], env=env, cwd=tmp).stdout.split()
    for line in lines:
        assert Path(line).resolve().is_relative_to(where.resolve()), (line, where)
        assert not Path(line).resolve().is_relative_to(ROOT), line
    cli = [python, "-m", "atlas_curate.cli"]
    _run([*cli, "synth", str(tmp / "release"), "--subjects", "1", "--jobs", "1"], env=env, cwd=tmp)
    _run([*cli, "bids-convert", str(tmp / "release"), str(tmp / "bids"), "--jobs", "1"], env=env, cwd=tmp)
    assert (tmp / "bids" / "dataset_description.json").is_file()
    assert (tmp / "bids" / "participants.json").is_file()     # written from metadata/ mapping tables


@pytest.mark.slow
def test_wheel_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # install the wheel with this environment's pip into the fresh venv's site-packages
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--target", str(site),
          str(wheel)])
    (site / "zz-test-deps.pth").write_text(DEPS + "\n")   # dependencies after the venv's own packages
    _check_install(python, dict(os.environ), site, tmp_path)


@pytest.mark.slow
def test_pip_install_prefix(wheel, tmp_path):
    prefix = tmp_path / "prefix"
    # --ignore-installed: otherwise pip uninstalls the test environment's own atlas-curate first
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--prefix", str(prefix),
          str(wheel)])
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    assert (site / "atlas_curate" / "data" / "templates" / "qc.json").is_file()
    _check_install(sys.executable, {**os.environ, "PYTHONPATH": str(site)}, site, tmp_path)


@pytest.mark.slow
def test_pip_install_target(wheel, tmp_path):
    target = tmp_path / "target"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--target", str(target),
          str(wheel)])
    _check_install(sys.executable, {**os.environ, "PYTHONPATH": str(target)}, target, tmp_path)


@pytest.mark.slow
def test_pip_install_user(wheel, tmp_path):
    base = getattr(sys, "_base_executable", sys.executable)
    userbase = tmp_path / "userbase"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONNOUSERSITE"}
    env["PYTHONUSERBASE"] = str(userbase)
    if subprocess.run([base, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip(f"{base} has no pip for a --user install")
    _run([base, "-m", "pip", "install", "--user", "--no-deps", "--ignore-installed", "--break-system-packages", "-q",
          str(wheel)], env=env)
    site = Path(_run([base, "-c", "import site; print(site.getusersitepackages())"], env=env).stdout.strip())
    assert (site / "atlas_curate" / "data" / "metadata" / "levels.json").is_file()
    # PYTHONPATH (the dependencies) comes first, but it holds no atlas_curate package: the test environment's
    # install is editable, mapped by a finder that only that environment's own site processing installs
    env_run = {**env, "PYTHONPATH": DEPS}
    lines = _run([base, "-c", PROBE], env=env_run, cwd=tmp_path).stdout.split()
    assert all(Path(line).resolve().is_relative_to(site.resolve()) for line in lines), lines
    cli = [base, "-m", "atlas_curate.cli"]
    _run([*cli, "synth", str(tmp_path / "release"), "--subjects", "1", "--jobs", "1"], env=env_run, cwd=tmp_path)
    _run([*cli, "bids-convert", str(tmp_path / "release"), str(tmp_path / "bids"), "--jobs", "1"], env=env_run,
         cwd=tmp_path)
    assert (tmp_path / "bids" / "participants.json").is_file()
