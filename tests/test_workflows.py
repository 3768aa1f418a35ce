"""Team workflows on a built pipeline (issue 8): resume a killed stage under `dvc repro`,
byte-identical metrics from `dvc repro --force`, experiments with `dvc exp run -S`.

All tests share the session's built pipeline (tiny params) and work in git clones of it
whose DVC cache is the built one, so nothing is rebuilt that a test does not change.
"""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, run

pytestmark = pytest.mark.slow

DVC = str(BIN / "dvc")


def _clone(built: Path, dest: Path) -> Path:
    """A git clone of the built pipeline with its outputs checked out from the shared cache."""
    run(["git", "clone", "-q", str(built), str(dest)], dest.parent)
    run([DVC, "cache", "dir", "--local", str(built / ".dvc/cache")], dest)
    run([DVC, "checkout", "-q"], dest)
    return dest


def _set(repo: Path, path: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, last = path.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_killed_stage_resumes_and_ends_like_an_uninterrupted_run(built_pipeline: Path, tmp_path: Path) -> None:
    repo = _clone(built_pipeline, tmp_path / "repo")
    # Killed right after its first checkpoint (step 5): 35 steps are left to resume, enough to
    # be sure it was cut mid-run, and few enough that the three runs stay cheap.
    _set(repo, "finetune.lxmert-vqa.train.max_steps", 40)
    _set(repo, "finetune.lxmert-vqa.train.checkpoint_every", 5)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    checkpoints = repo / "runs/finetune-lxmert-vqa/checkpoints"
    proc = subprocess.Popen([DVC, "repro", "finetune@lxmert-vqa"], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir())):
        assert proc.poll() is None, "the stage ended before its first checkpoint: raise max_steps"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage, as an OOM killer or a lost node would
    proc.wait()
    assert not (repo / "metrics/finetune/lxmert-vqa.json").exists() or not (
        repo / "models/finetuned/lxmert-vqa/model.safetensors"
    ).exists(), "the killed stage must not have finished"

    r = run([DVC, "repro", "finetune@lxmert-vqa"], repo)
    assert "resuming" in r.stderr + r.stdout, r.stderr
    resumed = (repo / "metrics/finetune/lxmert-vqa.json").read_bytes()

    # The same stage uninterrupted, from no checkpoint.
    run(["rm", "-rf", "runs"], repo)
    r = run([DVC, "repro", "--force", "--single-item", "finetune@lxmert-vqa"], repo)
    assert "resuming" not in r.stderr + r.stdout
    assert (repo / "metrics/finetune/lxmert-vqa.json").read_bytes() == resumed


def test_two_forced_repros_give_byte_identical_metrics(built_pipeline: Path) -> None:
    # The session fixture ran the whole DAG twice from nothing, in two directories:
    # `dvc repro` here and `dvc repro --force` in a twin (see conftest.built_pipeline).
    first, twin = built_pipeline.parent / "first_metrics", built_pipeline.parent / "twin_metrics"
    names = []

    def walk(d: filecmp.dircmp, prefix: str) -> None:
        assert not d.left_only and not d.right_only, (d.left_only, d.right_only)
        for name in d.common_files:
            names.append(prefix + name)
            a, b = (Path(d.left) / name).read_bytes(), (Path(d.right) / name).read_bytes()
            assert a == b, f"metrics/{prefix}{name} differs between two runs"
        for name, sub in d.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(first, twin), "")
    stages = yaml.safe_load((built_pipeline / "dvc.lock").read_text())["stages"]
    metric_files = {p for s in stages.values() for out in s.get("outs", []) if (p := out["path"]).startswith("metrics/")}
    assert {f"metrics/{n}" for n in names} >= metric_files and len(metric_files) >= 30


def test_exp_run_sets_a_param_and_metrics_diff_shows_it(built_pipeline: Path, tmp_path: Path) -> None:
    repo = _clone(built_pipeline, tmp_path / "repo")
    r = run([DVC, "exp", "run", "-S", "finetune.lxmert-gqa.train.lr=0.003", "--name", "lr3"], repo)
    # Run, or restored from DVC's run cache when an earlier run had these exact inputs.
    ran = sorted(line.split("'")[1] for line in r.stdout.splitlines()
                 if line.startswith("Running stage") or line.endswith("is cached - skipping run, checking out outputs"))  # fmt: skip
    assert ran == ["finetune@lxmert-gqa", "report", "submit@lxmert-gqa"], r.stdout
    show = run([DVC, "exp", "show", "--csv", "--only-changed"], repo).stdout
    assert "lr3" in show and "0.003" in show
    diff = run([DVC, "params", "diff", "HEAD", "lr3"], repo).stdout
    assert "finetune.lxmert-gqa.train.lr" in diff


def test_queued_experiments_run_with_queue_start(built_pipeline: Path, tmp_path: Path) -> None:
    repo = _clone(built_pipeline, tmp_path / "repo")
    # Paint's mask-predict steps: the cheapest key to re-run (paint, then report). One queued
    # experiment costs ~30 s of DVC's workspace handling here, so the queue holds one; the
    # README's sweep queues several the same way.
    run([DVC, "exp", "run", "--queue", "-S", "paint.steps=5", "--name", "q5"], repo)
    run([DVC, "queue", "start", "--jobs", "1"], repo)
    # Wait on git refs (cheap) rather than polling `dvc queue status` (2 s of CPU per call,
    # taken from the worker); ask DVC itself now and then, to stop early on a failure.
    deadline, polls = time.monotonic() + 400, 0
    while True:
        refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
        if "q5" in {ref.rsplit("/", 1)[-1] for ref in refs}:  # refs/exps/../<baseline>/<name>
            break
        polls += 1
        if polls % 15 == 0:
            status = run([DVC, "queue", "status"], repo).stdout
            assert "Failed" not in status, status
        assert time.monotonic() < deadline, run([DVC, "queue", "status"], repo).stdout
        time.sleep(1)
    status = run([DVC, "queue", "status"], repo).stdout
    assert status.count("Success") == 1, status
    show = run([DVC, "exp", "show", "--csv"], repo).stdout
    assert "q5" in show
    log = run([DVC, "queue", "logs", "q5"], repo).stdout
    ran = sorted(line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage"))
    assert ran == ["paint", "report"], log  # only the stages that read the key
