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
    _set(repo, "finetune.lxmert-vqa.train.max_steps", 150)
    _set(repo, "finetune.lxmert-vqa.train.checkpoint_every", 10)
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


# One stage of every kind (every stage function and every model's code path; the other
# fine-tuning keys run the same code on another task), in DAG order: a second, forced run of
# all 37 stages would double the suite's slowest part. The whole DAG was checked this way
# when the list was made.
FORCED = [
    "world", "tokenizer", "detector", "features@region", "features@grid", "codebook",
    "pretrain@lxmert", "pretrain@xlxmert", "pretrain@vlp", "pretrain@xvlm", "generator", "paint",
    "finetune@lxmert-nlvr2", "finetune@xlxmert-gqa", "finetune@vlp-caption", "finetune@vlp-vqa",
    "finetune@xvlm-retrieval", "finetune@xvlm-refcoco",
    "submit@lxmert-nlvr2", "submit@vlp-caption", "submit@xvlm-retrieval", "submit@xvlm-refcoco",
]  # fmt: skip


def test_forced_repro_gives_byte_identical_metrics(built_pipeline: Path, tmp_path: Path) -> None:
    repo = _clone(built_pipeline, tmp_path / "repo")
    r = run([DVC, "repro", "--force", "--single-item", *FORCED], repo)
    ran = [line.split("'")[1] for line in r.stdout.splitlines() if line.startswith("Running stage")]
    assert sorted(ran) == sorted(FORCED), r.stdout
    first = built_pipeline.parent / "first_metrics"
    cmp = filecmp.dircmp(first, repo / "metrics")
    names = []

    def walk(d: filecmp.dircmp, prefix: str) -> None:
        assert not d.left_only and not d.right_only, (d.left_only, d.right_only)
        for name in d.common_files:
            names.append(prefix + name)
            a, b = (Path(d.left) / name).read_bytes(), (Path(d.right) / name).read_bytes()
            assert a == b, f"metrics/{prefix}{name} differs between two runs"
        for name, sub in d.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(cmp, "")
    assert len(names) >= 30


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
    for lr in ("0.002", "0.004"):
        run([DVC, "exp", "run", "--queue", "-S", f"finetune.lxmert-nlvr2.train.lr={lr}", "--name", f"q{lr[-1]}"], repo)
    run([DVC, "queue", "start", "--jobs", "1"], repo)
    deadline = time.monotonic() + 400
    while True:
        status = run([DVC, "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 2, status
    show = run([DVC, "exp", "show", "--csv"], repo).stdout
    assert "q2" in show and "q4" in show
