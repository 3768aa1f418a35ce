"""Scale-out: a training stage re-launched under torchrun by a params switch (issue 8).

The 2-process run uses gloo on CPU. Its metrics must match the 1-process run of the same
global batch (``train.batch_size`` is global), and outputs are written once, by rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import BIN, run
from vlpipe.config import TrainParams
from vlpipe.train.launch import torchrun_command


def test_one_process_needs_no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert torchrun_command(TrainParams(), ["finetune", "lxmert-vqa"], "x") is None


def test_single_node_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cmd = torchrun_command(TrainParams(nproc_per_node=4), ["finetune", "lxmert-vqa", "-p", "p.yaml"], "finetune-lxmert-vqa")
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone",
                   "-m", "vlpipe", "finetune", "lxmert-vqa", "-p", "p.yaml"]  # fmt: skip


def test_multi_node_command_uses_the_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    train = TrainParams(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29400")
    cmd = torchrun_command(train, ["pretrain", "lxmert"], "pretrain-lxmert")
    assert cmd is not None
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400", "--rdzv_id=pretrain-lxmert"} <= set(cmd)
    assert "--standalone" not in cmd


def test_inside_torchrun_never_relaunches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_command(TrainParams(nproc_per_node=2), ["pretrain", "lxmert"], "x") is None


def test_several_nodes_need_an_endpoint() -> None:
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        TrainParams(nnodes=2)


def _stage_root(built: Path, work: Path, nproc: int) -> Path:
    """A root that sees the built pipeline's inputs and has its own outputs and params."""
    work.mkdir()
    (work / "data").symlink_to(built / "data")
    (work / "models").mkdir()
    (work / "models/pretrained").symlink_to(built / "models/pretrained")
    params = yaml.safe_load((built / "params.yaml").read_text())
    train = params["finetune"]["lxmert-vqa"]["train"]
    train.update(nproc_per_node=nproc, max_steps=3, batch_size=8, log_every=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


@pytest.mark.slow
def test_finetune_stage_runs_in_two_processes_like_one(built_pipeline: Path, tmp_path: Path) -> None:
    results = {}
    for nproc in (1, 2):
        root = _stage_root(built_pipeline, tmp_path / f"n{nproc}", nproc)
        run([str(BIN / "vlpipe"), "finetune", "lxmert-vqa"], root, OMP_NUM_THREADS="1")
        timing = json.loads((root / "reports/timing/finetune/lxmert-vqa.json").read_text())
        assert timing["processes"] == nproc
        results[nproc] = json.loads((root / "metrics/finetune/lxmert-vqa.json").read_text())
        out = root / "models/finetuned/lxmert-vqa"
        assert (out / "model.safetensors").is_file()
        # Rank 0 wrote once: no temporary or displaced copies beside the output.
        assert [p.name for p in out.parent.iterdir()] == ["lxmert-vqa"]
    one, two = results[1], results[2]
    # Same global batch and data order; not bitwise equal, because each rank draws its own
    # dropout (seed + rank) and gloo sums gradients in another order.
    assert one["steps"] == two["steps"] == 3
    assert set(two["val"]) == set(one["val"]) and set(two["train"]) == set(one["train"])
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=0.1)
