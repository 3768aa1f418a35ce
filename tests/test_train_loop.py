"""The shared training loop: overfitting, bitwise resume, torn checkpoints, DDP, optimizers."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vlpipe.config import TrainParams
from vlpipe.train.checkpoint import MODEL_FILE, load_latest_checkpoint
from vlpipe.train.loop import WeightAverage, fit
from vlpipe.train.optim import BertAdam, build_optimizer, build_scheduler, param_groups, warmup_linear
from vlpipe.train.sampler import DataPlan

REPO = Path(__file__).resolve().parents[1]



def toy_data(n: int = 64, dim: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = torch.sin(x @ torch.randn(dim, 1, generator=g))
    return [(x[i], y[i]) for i in range(n)]


def toy_model(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Dropout(dropout), nn.GELU(), nn.Linear(32, 1))


def toy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = batch
    err = model(x) - y  # (B, 1)
    mse, l1 = (err**2).mean(), err.abs().mean()
    return {"loss": mse + 0.1 * l1, "mse": mse, "l1": l1}


class Interrupt(Exception):
    """Raised by a step hook to simulate a killed run."""


def kill_at(n: int):
    def hook(step: int, _: dict) -> None:
        if step == n:
            raise Interrupt

    return hook


def _params(**kw) -> TrainParams:
    base = dict(max_steps=12, batch_size=16, lr=3e-3, checkpoint_every=4, log_every=1, warmup_ratio=0.1)
    return TrainParams(**{**base, **kw})


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tiny_model_overfits(tmp_path):
    data = toy_data(n=32)
    params = _params(max_steps=150, batch_size=8, lr=1e-2, log_every=10, checkpoint_every=1000)
    losses = []
    result = fit(
        toy_model(dropout=0.0), toy_loss, data, None, params, tmp_path,
        on_step_end=lambda step, v: losses.append(v["mse"]),
    )  # fmt: skip
    assert result.step == 150 and result.resumed_from is None
    assert sum(losses[-10:]) / 10 < 0.05 * sum(losses[:10]) / 10


def test_named_losses_and_eval_logged_to_dvclive_and_tensorboard(tmp_path):
    calls = []

    def eval_fn(model: nn.Module, step: int) -> dict[str, float]:
        calls.append((step, model.training))
        return {"score": float(step)}

    result = fit(toy_model(), toy_loss, toy_data(), None, _params(max_steps=5, log_every=2, eval_every=2),
                 tmp_path, eval_fn=eval_fn)  # fmt: skip
    assert calls == [(2, False), (4, False), (5, False)] and result.eval_metrics == {"score": 5.0}
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert {"loss", "mse", "l1", "lr", "grad_norm"} <= set(metrics["train"])
    assert metrics["eval"]["score"] == 5.0
    rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "mse.tsv").read_text().split()
    assert rows[:2] == ["step", "mse"] and rows[2::2] == ["2", "4", "5"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_interrupted_run_resumes_to_bitwise_identical_weights(tmp_path):
    data, params = toy_data(), _params()  # dropout on: the torch RNG state must be restored too
    straight = fit(toy_model(), toy_loss, data, None, params, tmp_path / "a")
    with pytest.raises(Interrupt):
        fit(toy_model(), toy_loss, data, None, params, tmp_path / "b", on_step_end=kill_at(7))
    assert load_latest_checkpoint(tmp_path / "b" / "checkpoints").step == 4
    resumed = fit(toy_model(), toy_loss, data, None, params, tmp_path / "b")
    assert resumed.resumed_from == 4 and resumed.step == 12
    _assert_bitwise_equal(_weights(straight.model), _weights(resumed.model))
    # the history logged after the checkpoint by the killed run is replaced, not duplicated
    rows = (tmp_path / "b" / "live" / "plots" / "metrics" / "train" / "mse.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == [str(s) for s in range(1, 13)]
    # 12 steps over 4 per epoch crosses epochs: the data order was fast-forwarded, not replayed
    assert not torch.equal(_weights(toy_model())["0.weight"], _weights(resumed.model)["0.weight"])


def test_torn_checkpoint_is_skipped(tmp_path):
    data, params = toy_data(), _params(keep_checkpoints=3)
    straight = fit(toy_model(), toy_loss, data, None, params, tmp_path / "a")
    with pytest.raises(Interrupt):
        fit(toy_model(), toy_loss, data, None, params, tmp_path / "b", on_step_end=kill_at(9))
    ckpts = tmp_path / "b" / "checkpoints"
    newest = ckpts / "step_00000008"
    blob = (newest / MODEL_FILE).read_bytes()
    (newest / MODEL_FILE).write_bytes(blob[: len(blob) // 2])  # torn write
    assert load_latest_checkpoint(ckpts).step == 4
    resumed = fit(toy_model(), toy_loss, data, None, params, tmp_path / "b")
    assert resumed.resumed_from == 4
    _assert_bitwise_equal(_weights(straight.model), _weights(resumed.model))


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    data = toy_data()
    fit(toy_model(), toy_loss, data, None, _params(max_steps=4), tmp_path)
    again = fit(toy_model(), toy_loss, data, None, _params(max_steps=4, lr=1e-3), tmp_path)
    assert again.resumed_from is None and again.step == 4
    assert load_latest_checkpoint(tmp_path / "checkpoints").state["fingerprint"]


def test_sharding_covers_the_global_batch_exactly():
    one = DataPlan(num_samples=50, batch_size=12, world_size=1, grad_accum=1, seed=3)
    two = DataPlan(num_samples=50, batch_size=12, world_size=2, grad_accum=3, seed=3)
    order = one.epoch_order(1)
    assert sorted(order.tolist()) == list(range(50))
    assert not (order == one.epoch_order(2)).all()
    for step in range(one.steps_per_epoch):
        merged = [i for r in range(2) for mb in two.step_indices(order, step, r) for i in mb]
        assert merged == one.step_indices(order, step, 0)[0]
        assert all(len(mb) == 2 for mb in two.step_indices(order, step, 1))
    with pytest.raises(ValueError, match="divisible"):
        DataPlan(num_samples=50, batch_size=10, world_size=3, grad_accum=1, seed=0)


DDP_MAIN = """
import json, os, sys
from pathlib import Path
from safetensors.torch import save_file
from vlpipe.config import TrainParams
from vlpipe.train.loop import WeightAverage, fit

torch.set_num_threads(1)
out = Path(sys.argv[1])
params = TrainParams(**json.loads(sys.argv[2]))
result = fit(toy_model(dropout=0.0), toy_loss, toy_data(), None, params, out)
if os.environ.get("RANK", "0") == "0":
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(out / "final.safetensors"))
"""


def test_two_process_torchrun_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_train.py"
    toy = "\n\n".join(inspect.getsource(f) for f in (toy_data, toy_model, toy_loss))
    script.write_text("import torch\nfrom torch import nn\n\n" + toy + DDP_MAIN)
    settings = {"max_steps": 3, "batch_size": 16, "lr": 1e-2, "warmup_ratio": 0.0}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*cmd, str(script), str(tmp_path / "ddp"), json.dumps(settings)], check=True, env=env, timeout=240)
    ddp = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    # 1 process with 2 accumulation micro-steps sees the same 16 samples per step as 2 x 8
    params = TrainParams(**settings, grad_accum=2)
    single = fit(toy_model(dropout=0.0), toy_loss, toy_data(), None, params, tmp_path / "single").model.state_dict()
    start = toy_model(dropout=0.0).state_dict()
    assert not torch.allclose(single["0.weight"], start["0.weight"])  # it did train
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6)
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["world_size"] == 2  # really two processes, each on its half of the batch


# --------------------------------------------------------------------------- optim


def test_warmup_then_linear_decay():
    values = [warmup_linear(s, total_steps=10, warmup_steps=2) for s in range(10)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.4 * v for v in values])


def test_bertadam_has_no_bias_correction():
    p0 = torch.tensor([1.0, -2.0, 0.5])
    g = torch.tensor([0.3, -0.1, 2.0])
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-6, 0.01
    p = nn.Parameter(p0.clone())
    opt = BertAdam([{"params": [p], "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps)
    p.grad = g.clone()
    opt.step()
    m, v = (1 - b1) * g, (1 - b2) * g * g  # no division by (1 - b^t)
    expected = p0 - lr * (m / (v.sqrt() + eps) + wd * p0)
    # 1e-6: a float32 ulp at |p| ~ 2 is 1.2e-7, and CPUs differ in fusing the update (FMA);
    # bias correction would be off by ~1e-1.
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    # Adam with bias correction would move each weight by ~lr: ours moves by ~lr * 0.1 / sqrt(0.001)
    assert not torch.allclose(p.detach(), p0 - lr * g.sign(), atol=1e-3)


def test_no_weight_decay_on_bias_and_layernorm():
    model = toy_model()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "4.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight", "4.bias"]
    assert no_decay["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, TrainParams(optimizer="bertadam")), BertAdam)
    assert isinstance(build_optimizer(model, TrainParams()), torch.optim.AdamW)


def test_lr_scales_give_a_prefix_its_own_rate_through_the_schedule():
    model = toy_model()  # 0: Linear, 1: LayerNorm, 4: Linear
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.01, lr=1e-3, lr_scales={"4.": 0.1})
    by_name = {names[id(p)]: (g.get("lr"), g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_name["4.weight"] == (pytest.approx(1e-4), 0.01)
    assert by_name["4.bias"] == (pytest.approx(1e-4), 0.0)
    assert by_name["0.weight"] == (None, 0.01) and by_name["1.weight"] == (None, 0.0)  # the base rate
    # The warmup/decay schedule scales both rates alike
    opt = build_optimizer(model, TrainParams(lr=1e-3), {"4.": 0.1})
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2)
    rates = {}
    for g in opt.param_groups:
        for p in g["params"]:
            rates[names[id(p)]] = g["lr"]
    assert rates["0.weight"] == pytest.approx(0.5e-3) and rates["4.weight"] == pytest.approx(0.5e-4)
    opt.step()  # no gradients yet: changes nothing, keeps the optimizer-then-scheduler order
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    # A frozen prefix drops out; a prefix that names nothing is an error, not a silent no-op
    model[4].requires_grad_(False)
    assert all("lr" not in g for g in param_groups(model, 0.01, lr=1e-3, lr_scales={"4.": 0.1}))
    with pytest.raises(ValueError, match="vision"):
        param_groups(model, 0.01, lr=1e-3, lr_scales={"vision.": 0.1})


def test_live_dir_torn_by_a_kill_is_repaired_before_resuming(tmp_path):
    from dvclive import Live

    from vlpipe.train.loop import _drop_rows_after

    live_dir = tmp_path / "live"
    plots = live_dir / "plots" / "metrics" / "train"
    plots.mkdir(parents=True)
    (live_dir / "metrics.json").write_text("")  # killed while DVCLive rewrote its summary
    (plots / "loss.tsv").write_text("step\tloss\n10\t1.5\n20\t1.25\n30\t1.0\n1\t0.7")  # step 15 torn to "1"
    (plots / "lr.tsv").write_text("ste")  # torn header
    (plots / "grad_norm.tsv").write_text("step\tgrad_norm\n10\t2.0\n20\t1.\n25")
    _drop_rows_after(live_dir, 20)
    assert not (live_dir / "metrics.json").exists() and not (plots / "lr.tsv").exists()
    assert (plots / "loss.tsv").read_text() == "step\tloss\n10\t1.5\n20\t1.25\n"
    assert (plots / "grad_norm.tsv").read_text() == "step\tgrad_norm\n10\t2.0\n20\t1.\n"
    live = Live(str(live_dir), dvcyaml=False, resume=True, save_dvc_exp=False)  # would raise on the torn JSON
    live.end()


def test_weight_average_follows_its_formula():
    model = nn.Linear(2, 1)
    model.bias.requires_grad_(False)  # frozen: not averaged
    avg = WeightAverage(model, decay=0.9)
    assert set(avg.shadow) == {"weight"}
    expected = model.weight.detach().clone()
    for step in range(1, 40):
        with torch.no_grad():
            model.weight.add_(float(step))
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * model.weight.detach()
        avg.update(model, step)
        assert torch.allclose(avg.shadow["weight"], expected), step
    assert avg.factor(1) == pytest.approx(2 / 11) and avg.factor(1000) == 0.9
    own = model.weight.detach().clone()
    with avg.applied(model):
        assert torch.equal(model.weight, avg.shadow["weight"])
    assert torch.equal(model.weight, own)  # the block gives the model its own weights back
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_ema_run_evaluates_and_returns_the_average(tmp_path):
    """eval_fn sees the average of the iterates, the returned model holds it, and an interrupted
    averaged run resumes to the same weights (the average travels in the checkpoint)."""
    model = toy_model()
    reference: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[tuple[int, float, float]] = []

    def track(step: int, _: dict) -> None:  # the model holds the iterate during training
        d = min(0.95, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            reference[n] = d * reference[n] + (1 - d) * p.detach()

    def eval_fn(m: nn.Module, step: int) -> dict[str, float]:
        return {"w": float(m[0].weight[0, 0])}

    def on_step(step: int, values: dict) -> None:
        track(step, values)
        if step % 4 == 0:
            seen.append((step, float(reference["0.weight"][0, 0]), float(model[0].weight.detach()[0, 0])))

    params = _params(eval_every=4)
    result = fit(model, toy_loss, toy_data(), None, params, tmp_path / "a", eval_fn=eval_fn, ema_decay=0.95,
                 on_step_end=on_step)  # fmt: skip
    for n, p in result.model.named_parameters():
        assert torch.allclose(p, reference[n], atol=1e-6), n
    last_iterate = seen[-1][2]
    assert result.eval_metrics["w"] == pytest.approx(seen[-1][1], abs=1e-6)
    assert abs(last_iterate - seen[-1][1]) > 1e-4  # the average is not the last iterate
    logged = json.loads((tmp_path / "a" / "live" / "metrics.json").read_text())
    assert logged["eval"]["w"] == pytest.approx(seen[-1][1], abs=1e-6)

    with pytest.raises(Interrupt):
        fit(toy_model(), toy_loss, toy_data(), None, params, tmp_path / "b", ema_decay=0.95, on_step_end=kill_at(7))
    resumed = fit(toy_model(), toy_loss, toy_data(), None, params, tmp_path / "b", ema_decay=0.95)
    assert resumed.resumed_from == 4
    _assert_bitwise_equal(_weights(result.model), _weights(resumed.model))
    plain = fit(toy_model(), toy_loss, toy_data(), None, params, tmp_path / "b")  # other settings: fresh run
    assert plain.resumed_from is None
