"""Wall time of ``atlas-curate demo`` per stage, the default against ``--full`` (the larger demo, which is
what ``demo`` ran before it was cut down), and whether the default demo's network learned: its test Dice
against an untrained network's on the same test scans.

Both demos run as the user runs them (the ``atlas-curate`` command in a fresh folder, progress bars included),
one after the other, so both figures come from the same machine in the same state. The untrained network is
the demo's own configuration trained for one iteration at a learning rate of 1e-12 (its weights are the
seeded initial ones), evaluated by ``evaluate`` on the demo's split.

    python benchmarks/bench_demo.py                      # default demo, then --full (about 25 minutes on 2 cores)
    python benchmarks/bench_demo.py --skip-full          # the default demo only (about 5 minutes)
    python benchmarks/bench_demo.py --workdir /scratch/bench --jobs 2 --check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("synth", "bids-convert", "normalize", "overlap-map", "split", "train-baseline", "evaluate", "predict")
TARGET_S = 360.0


def run_demo(out: Path, jobs: int, full: bool) -> tuple[float, dict[str, float], str]:
    """Run the demo command; return (wall seconds, seconds per stage, its output)."""
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("atlas-curate")
    command = [str(exe) if exe.exists() else "atlas-curate", "demo", str(out), "--jobs", str(jobs)]
    if full:
        command.append("--full")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stages = {m[1]: float(m[2]) for m in re.finditer(r"^ +(\S+) +(\d+\.\d) s$", done.stdout, re.M)
              if m[1] in STAGES}
    return wall, stages, done.stdout


def untrained_dsc(out: Path) -> float:
    """Test DSC of the demo's network configuration with its initial weights, on the demo's split."""
    from atlas_curate.demo import DEMO_TRAINING
    from atlas_curate.evaluate import evaluate
    from atlas_curate.train import train

    config = json.loads(json.dumps(DEMO_TRAINING))
    stage = config["stages"][-1]
    config["stages"] = [{**stage, "epochs": 1, "lr": 1e-12, "restart_period": 1, "iterations_per_epoch": 1,
                         "batch_size": 1, "snapshot_epochs": [1]}]
    run = out / "run-untrained"
    shutil.rmtree(run, ignore_errors=True)
    bids = out / "bids"
    train(bids, bids / "derivatives" / "atlas-curate" / "split.tsv", run, preset="quick", config=config,
          progress=False)
    return float(evaluate(run, split="test", progress=False, n_resamples=200).summary.set_index("metric")
                 .loc["dsc", "mean"])


def test_dsc(out: Path, run: str) -> tuple[float, int]:
    doc = json.loads((out / run / "eval-test" / "summary.json").read_text())
    return float(doc["metrics"]["dsc"]["mean"]), int(doc["metrics"]["dsc"]["n"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "atlas-curate-bench-demo")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-full", action="store_true", help="only the default demo")
    parser.add_argument("--keep", action="store_true", help="keep the demo folders")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 unless the default demo takes at most {TARGET_S:.0f} s and its test DSC is "
                             "at least 0.2 above the untrained network's")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    print(f"CPUs {len(os.sched_getaffinity(0))}, --jobs {args.jobs}")
    results = {}
    for name, full in (("default", False), ("full", True)):
        if full and args.skip_full:
            continue
        out = args.workdir / name
        wall, stages, _ = run_demo(out, args.jobs, full)
        run = "run-quick" if full else "run-demo"
        dsc, n = test_dsc(out, run)
        results[name] = {"wall": wall, "stages": stages, "dsc": dsc, "n": n, "out": out}
        print(f"{name:<8} {wall:7.1f} s wall, test DSC {dsc:.3f} over {n} scans")

    default = results["default"]
    untrained = untrained_dsc(default["out"])
    print(f"\ndefault demo: test DSC {default['dsc']:.3f}; untrained network on the same {default['n']} test scans: "
          f"{untrained:.3f}")
    print("\nwall time per stage (s):")
    names = list(results)
    print(f"  {'stage':<15}" + "".join(f"{n:>10}" for n in names) + ("   full/default" if len(names) > 1 else ""))
    for stage in STAGES:
        values = [results[n]["stages"].get(stage, float("nan")) for n in names]
        ratio = f"   {values[1] / values[0]:8.1f}x" if len(values) > 1 and values[0] > 0 else ""
        print(f"  {stage:<15}" + "".join(f"{v:10.1f}" for v in values) + ratio)
    walls = [results[n]["wall"] for n in names]
    ratio = f"   {walls[1] / walls[0]:8.1f}x" if len(walls) > 1 else ""
    print(f"  {'command wall':<15}" + "".join(f"{w:10.1f}" for w in walls) + ratio)
    print(f"\ntarget: default demo <= {TARGET_S:.0f} s: {'met' if default['wall'] <= TARGET_S else 'NOT met'}")
    if not args.keep:
        for result in results.values():
            shutil.rmtree(result["out"], ignore_errors=True)
    if args.check and (default["wall"] > TARGET_S or default["dsc"] < untrained + 0.2):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
