"""Shared fixtures: tiny params so every test runs offline on CPU in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Keep tests from fighting over the two cores and from touching any hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: vlpipe, dvc, torchrun


@pytest.fixture
def repo_root() -> Path:
    return REPO


FAST = {"max_steps": 3, "batch_size": 8, "log_every": 1}
SMALL = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_overrides() -> dict:
    """Overrides of the default params that make the whole DAG run in seconds."""
    from vlpipe.config import dump_defaults

    return {
        "world": {
            "scene": {"n_train": 48, "n_val": 16, "n_test": 16},
            "text": {"nlvr2_sentences": {"train": 12, "val": 6, "test": 6}},
        },
        "tokenizer": {"vocab_size": 200},
        "detector": {"epochs": 1, "channels": [8, 16], "feature_dim": 16, "batch_size": 16},
        "features": {"region": {"num_boxes": 8}},
        "codebook": {"k": 8, "iterations": 3},
        "pretrain": {
            "lxmert": {
                "model": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
                "train": dict(FAST),
                "val_max_examples": 16,
            },
            "xlxmert": {"model": dict(SMALL), "train": dict(FAST), "val_max_examples": 16},
            "vlp": {"model": dict(SMALL), "train": dict(FAST), "val_max_examples": 16},
            "xvlm": {"train": dict(FAST), "val_max_images": 8},
        },
        "generator": {"train": dict(FAST), "val_max_images": 8},
        "paint": {"num_captions": 8, "steps": 2, "sheet_size": 4, "rprecision_candidates": 4},
        "finetune": {
            key: {"train": {"max_steps": 2, "batch_size": 8, "log_every": 1}}
            for key in dump_defaults()["finetune"]
        }
        | {"vlp-caption": {"train": {"max_steps": 2, "batch_size": 8, "log_every": 1}, "beam_size": 2, "max_length": 8}}
        # The optional recipe steps run in the tiny DAG too, whatever their defaults.
        | {"xvlm-nlvr2": {"train": {"max_steps": 2, "batch_size": 8, "log_every": 1},
                         "text_assignment": {"max_steps": 2, "batch_size": 8, "log_every": 1}},
           "lxmert-gqa": {"train": {"max_steps": 2, "batch_size": 8, "log_every": 1}, "mirror": "both"}},
    }


def deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


@pytest.fixture
def tiny_params() -> dict:
    """The default params with :func:`tiny_overrides` applied (plain data)."""
    from vlpipe.config import dump_defaults

    return deep_update(dump_defaults(), tiny_overrides())


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated world (data/world layout), shared by the tests that read world files."""
    from vlpipe.config import WorldParams
    from vlpipe.data.world import generate_world

    out = tmp_path_factory.mktemp("world") / "world"
    out.mkdir()
    params = WorldParams.model_validate(deep_update(WorldParams().model_dump(mode="json"), tiny_overrides()["world"]))
    generate_world(params, out)
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run a command as a user would (the venv's bin first on PATH); fail with its output."""
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1", **env)
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def make_pipeline_repo(work: Path) -> Path:
    """A git+dvc copy of this repo's DAG and code at ``work`` with tiny params (nothing run yet)."""
    import yaml

    from vlpipe.config import dump_defaults

    work.mkdir(parents=True)
    for name in ["dvc.yaml", ".dvcignore"]:
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = deep_update(dump_defaults(), tiny_overrides())
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / ".gitignore").write_text("/runs/\n/reports/timing/\n")
    run(["git", "init", "-q"], work)
    git_commit(work, "init")
    return work


def git_commit(work: Path, message: str) -> None:
    run(["git", "add", "-A"], work)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], work)


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full ``dvc repro`` of the DAG with tiny params, committed (dvc.lock included).

    Shared by every test that needs a built pipeline, because building it is the slowest thing
    in the suite. Tests that change it restore what they change; tests that need a pristine
    state ``git clone`` it. A copy of its metrics is kept in ``first_metrics/`` (outside the
    repo), and ``twin_metrics/`` holds those of a second, independent ``dvc repro --force`` of
    the same DAG and params in another directory, run at the same time on the other core (the
    stages are mostly single-threaded start-up), for the reproducibility test. Both runs use
    one torch thread each, so they neither compete for cores nor differ in reduction order.
    ``VLPIPE_TEST_BUILT=DIR`` (a directory holding ``repo/``, ``first_metrics/`` and
    ``twin_metrics/`` of an earlier build of the same code) skips the build while developing
    tests; never set it in CI.
    """
    base = tmp_path_factory.mktemp("pipeline")
    reuse = os.environ.get("VLPIPE_TEST_BUILT")  # developers only: a copy of an earlier build
    if reuse:
        shutil.copytree(Path(reuse) / "repo", base / "repo", symlinks=True)
        for name in ("first_metrics", "twin_metrics"):
            shutil.copytree(Path(reuse) / name, base / name)
        return base / "repo"
    work = make_pipeline_repo(base / "repo")
    twin = make_pipeline_repo(base / "twin")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    runs = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, cwd in (([str(BIN / "dvc"), "repro"], work), ([str(BIN / "dvc"), "repro", "--force"], twin))
    ]
    for proc, cwd in zip(runs, (work, twin), strict=True):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise AssertionError(f"dvc repro in {cwd} failed ({proc.returncode}):\n{out}")
    git_commit(work, "dvc repro")
    shutil.copytree(work / "metrics", base / "first_metrics")
    shutil.copytree(twin / "metrics", base / "twin_metrics")
    shutil.rmtree(twin)
    return work
