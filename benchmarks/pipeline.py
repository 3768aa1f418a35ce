"""Wall time of a full ``dvc repro`` of the pipeline, per stage, and of a no-op ``dvc repro``.

Copies the DAG, the code and params.yaml into a fresh git+DVC repository in a temporary
directory (nothing of this checkout is touched), runs ``dvc repro`` there once from nothing,
timing every stage from its "Running stage" line to the next, then runs ``dvc repro`` again
(everything up to date: the no-op cost, mostly DVC hashing the dependencies). Targets
(issue 8): full run under 30 min on 2 CPU cores, no-op under 5 s.

    python benchmarks/pipeline.py                 # the default params (tens of minutes)
    python benchmarks/pipeline.py --tiny          # the tests' tiny params (a few minutes)
    python benchmarks/pipeline.py --keep DIR      # keep the built repository in DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_repo(work: Path, tiny: bool) -> None:
    work.mkdir(parents=True)
    for name in ["dvc.yaml", ".dvcignore", "params.yaml"]:
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import deep_update, tiny_overrides
        from vlpipe.config import dump_defaults

        params = deep_update(dump_defaults(), tiny_overrides())
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):  # fmt: skip
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)


def timed_repro(work: Path) -> tuple[float, list[tuple[str, float]]]:
    """Run ``dvc repro``; total seconds and (stage, seconds) in run order."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    start = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    stages: list[tuple[str, float]] = []
    current, since = None, start
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current is not None:
                stages.append((current, now - since))
            current, since = line.split("'")[1], now
    end = time.perf_counter()
    if current is not None:
        stages.append((current, end - since))
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed in {work} (exit {proc.returncode})")
    return end - start, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny params instead of params.yaml")
    ap.add_argument("--keep", type=Path, help="build in this (new) directory and keep it")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="vlpipe-bench-")) / "repo"
    try:
        make_repo(base, args.tiny)
        print(f"params: {'tiny' if args.tiny else 'default'}; cores: {os.cpu_count()}; repo: {base}")
        full, stages = timed_repro(base)
        width = max((len(name) for name, _ in stages), default=5)
        for name, seconds in stages:
            print(f"  {name:<{width}}  {seconds:8.1f} s")
        print(f"full dvc repro: {full:.1f} s ({full / 60:.1f} min; target < 30 min) for {len(stages)} stages")
        noop, ran = timed_repro(base)
        if ran:
            raise SystemExit(f"second dvc repro re-ran {[name for name, _ in ran]}: the pipeline is not stable")
        print(f"no-op dvc repro: {noop:.2f} s (target < 5 s); ratio full/no-op: {full / noop:.0f}x")
    finally:
        if args.keep is None:
            shutil.rmtree(base.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
