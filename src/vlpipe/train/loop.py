"""The training loop shared by every model: one explicit loop on HF Accelerate.

``fit`` trains ``model`` on ``train_dataset`` with ``loss_fn`` and returns a
:class:`TrainResult`. What it takes care of, in the order of one optimizer step:

1. the data order (:mod:`vlpipe.train.sampler`): a seeded permutation per epoch, cut into
   global batches, sharded over the processes ``torchrun`` starts (gloo on CPU, NCCL on GPU)
   and into ``grad_accum`` micro-batches;
2. forward + backward of each micro-batch (``loss_fn(model, batch)["loss"] / grad_accum``),
   gradients synchronised only on the last one; autocast (bf16/fp16) only on a GPU;
3. global gradient-norm clipping, optimizer step (AdamW or BertAdam), LR schedule step;
4. every ``log_every`` steps: every named loss (mean over the interval and the processes),
   lr and gradient norm to DVCLive and TensorBoard (rank 0 only);
5. every ``eval_every`` steps and at the end: ``eval_fn(model, step)`` in eval mode;
6. every ``checkpoint_every`` steps and at the end: an atomic checkpoint with optimizer,
   scheduler and all processes' RNG states (rank 0 writes);
7. with ``ema_decay``: an exponential moving average of the trained weights
   (:class:`WeightAverage`) after every step; evaluation reads it, checkpoints keep it, and the
   model ``fit`` returns holds it.

On start it resumes from the newest complete checkpoint of the same settings, so an
interrupted run ends with exactly the weights of an uninterrupted one (CPU, same seed,
``num_workers=0`` or a collate without randomness). ``loss_fn`` must call ``model(...)``
(not ``model.module``) so DDP sees the forward pass, and should return the same loss names
at every step; randomness it needs (masking) should come from the global torch RNG, which
checkpoints capture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, send_to_device
from torch import nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from vlpipe.config import TrainParams
from vlpipe.errors import InputError
from vlpipe.io import atomic_file
from vlpipe.train.checkpoint import (
    capture_rng_state,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from vlpipe.train.optim import build_optimizer, build_scheduler, num_warmup_steps
from vlpipe.train.sampler import DataPlan, EpochBatchSampler

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]
EvalFn = Callable[[nn.Module, int], dict[str, float]]
StepHook = Callable[[int, dict[str, float]], None]

# Settings that change how often we log or save, not what is computed: left out of the
# fingerprint so changing them does not throw a resumable checkpoint away.
CADENCE_FIELDS = {"checkpoint_every", "keep_checkpoints", "log_every", "num_workers"}


class WeightAverage:
    """Exponential moving average of a model's trainable weights (Polyak averaging).

    After optimizer step t (1-based): ``avg = d_t * avg + (1 - d_t) * w`` with
    ``d_t = min(decay, (1 + t) / (10 + t))``, the warm-up of TensorFlow's
    ``ExponentialMovingAverage(num_updates=t)``, so the average does not drag the initial weights
    along for ~1 / (1 - decay) steps. The average of the last few hundred steps of a noisy
    fine-tuning sits nearer the middle of the basin than the last iterate (Polyak & Juditsky
    1992; Izmailov et al., "Averaging Weights Leads to Wider Optima", UAI 2018). Frozen
    parameters and buffers are not averaged (they do not move). Kept in float32.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def factor(self, step: int) -> float:
        """``d_t`` of optimizer step ``step`` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.factor(step)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # avg += (1 - d) (w - avg)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trained weights with the average."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it."""
        kept = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.shadow}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in kept:
                        p.copy_(kept[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: Path) -> None:
        if set(state) != set(self.shadow):
            raise InputError(source, f"its averaged weights do not fit the model: {sorted(set(state) ^ set(self.shadow))[:5]}")
        for name, t in state.items():
            self.shadow[name].copy_(t)


@dataclass
class TrainResult:
    """What :func:`fit` returns. ``model`` is the trained, unwrapped module (same object)."""

    model: nn.Module
    step: int
    total_steps: int
    resumed_from: int | None
    losses: dict[str, float] = field(default_factory=dict)  # last logged means
    eval_metrics: dict[str, float] = field(default_factory=dict)  # last eval_fn result
    train_seconds: float = 0.0
    samples_per_second: float = 0.0


def run_fingerprint(params: TrainParams, num_samples: int, extra: str = "") -> str:
    """Digest of everything that decides the weights: settings, dataset size and ``extra``
    (the caller's model/data description). A checkpoint is resumed only when it matches."""
    settings = params.model_dump(mode="json", exclude=CADENCE_FIELDS)
    blob = json.dumps({"train": settings, "num_samples": num_samples, "extra": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs; deterministic kernels on CPU.

    Without deterministic algorithms some CPU kernels (X-VLM's patch convolution) gave losses
    that differed in the 7th digit between two runs of the same stage, depending on buffer
    alignment; with them two ``dvc repro --force`` runs give byte-identical metrics. On a
    GPU we keep cuDNN's fast nondeterministic kernels (speed matters there, bitwise equality
    is not promised).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_accelerator(params: TrainParams) -> Accelerator:
    """Accelerate for this process: DDP under torchrun, autocast only when a GPU is there."""
    on_gpu = torch.cuda.is_available()
    return Accelerator(
        cpu=not on_gpu,
        mixed_precision=params.mixed_precision if on_gpu else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=params.find_unused_parameters)],
    )


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/python from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _epoch_batches(
    dataset: Sequence, collate_fn: Callable | None, plan: DataPlan, epoch: int, rank: int, start: int, workers: int
) -> Iterator[Any]:
    """This rank's micro-batches of ``epoch`` from optimizer step ``start`` on."""
    # A private generator: creating the iterator must not draw from the global torch RNG,
    # or a run resumed mid-epoch would see a different RNG stream than an uninterrupted one.
    generator = torch.Generator().manual_seed(plan.seed * 100_003 + epoch)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=EpochBatchSampler(plan, epoch, rank, start),
        collate_fn=collate_fn or default_collate,
        num_workers=workers,
        generator=generator,
        worker_init_fn=_seed_worker if workers else None,
    )
    return iter(loader)


def _drop_rows_after(live_dir: Path, step: int) -> None:
    """Make a killed run's DVCLive directory safe to resume at ``step``.

    Removes history rows logged after ``step`` (by a run killed after its last checkpoint), so
    a resumed run's plots have each step once, and whatever a SIGKILL tore mid-write (DVCLive
    writes in place): a row that does not parse, a TSV without its header, a summary JSON that
    does not parse (DVCLive rewrites it at the next step).
    """
    for summary in live_dir.glob("*.json"):
        try:
            json.loads(summary.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            summary.unlink()
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        try:
            lines = tsv.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            lines = []
        header = lines[0].split("\t") if lines else []
        if "step" not in header:
            tsv.unlink()
            continue
        col = header.index("step")
        kept, last = [], -1
        for row in lines[1:]:
            at = _row_step(row, len(header), col)
            # A torn row may still parse (e.g. step 15 cut to 1): steps must keep increasing.
            if at is not None and last < at <= step:
                kept.append(row)
                last = at
        if len(kept) < len(lines) - 1:
            with atomic_file(tsv, "w", encoding="utf-8") as f:
                f.write("\n".join([lines[0], *kept]) + "\n")


def _row_step(row: str, width: int, col: int) -> int | None:
    """The step of a DVCLive TSV row, or None when the row is not complete."""
    fields = row.split("\t")
    if len(fields) != width:
        return None
    try:
        [float(v) for i, v in enumerate(fields) if i != col]
        return int(fields[col])
    except ValueError:
        return None


class _Logger:
    """DVCLive + TensorBoard on rank 0; a no-op elsewhere."""

    def __init__(self, live: Any, live_dir: Path, tb_dir: Path, active: bool, start_step: int):
        self.active = active
        self.own_live = False
        self.live, self.tb = None, None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        if live is None:
            from dvclive import Live

            if start_step > 0:
                _drop_rows_after(live_dir, start_step)
            live = Live(str(live_dir), dvcyaml=False, resume=start_step > 0, save_dvc_exp=False)
            self.own_live = True
        self.live = live
        # purge_step: TensorBoard hides events of a killed run logged after the checkpoint
        self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step or None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
            self.tb.add_scalar(name, value, step)
        self.live.make_summary()

    def close(self) -> None:
        if not self.active:
            return
        self.tb.close()
        if self.own_live:
            self.live.end()


def _optimizer_step(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterator[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    params: TrainParams,
) -> dict[str, torch.Tensor]:
    """grad_accum forward/backward passes, clipping, one optimizer and scheduler step.

    Returns the detached losses (mean over micro-batches), plus ``lr`` and ``grad_norm``.
    """
    sums: dict[str, torch.Tensor] = {}
    for i in range(params.grad_accum):
        batch = send_to_device(next(batches), accelerator.device)
        last = i == params.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            losses = loss_fn(model, batch)
            if "loss" not in losses:
                raise KeyError(f"loss_fn must return a dict with the total under 'loss'; got {sorted(losses)}")
            accelerator.backward(losses["loss"] / params.grad_accum)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / params.grad_accum
    sums["lr"] = torch.tensor(optimizer.param_groups[0]["lr"], device=accelerator.device)
    if params.max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(model.parameters(), params.max_grad_norm)
        sums["grad_norm"] = torch.as_tensor(norm, device=accelerator.device).detach().float()
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in place
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def _mean_over_processes(accelerator: Accelerator, window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each named value over the logging window and over all processes."""
    names = sorted(window[-1])
    local = torch.stack([torch.stack([w[n] for w in window if n in w]).mean() for n in names])
    reduced = accelerator.reduce(local, reduction="mean")
    return {n: float(v) for n, v in zip(names, reduced.tolist(), strict=True)}


def _evaluate(model: nn.Module, eval_fn: EvalFn, step: int, average: WeightAverage | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    with torch.no_grad(), average.applied(model) if average is not None else nullcontext():
        metrics = eval_fn(model, step)
    model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


@dataclass
class _Run:
    """Everything one ``fit`` call sets up: the prepared objects and where the run starts."""

    accelerator: Accelerator
    plan: DataPlan
    total_steps: int
    model: nn.Module  # as prepared by Accelerate (DDP-wrapped under torchrun)
    raw_model: nn.Module  # unwrapped: what checkpoints and eval_fn see
    optimizer: torch.optim.Optimizer  # the plain optimizer (its state is checkpointed)
    prepared_optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpoint_dir: Path
    fingerprint: str
    start_step: int
    resumed_from: int | None
    average: WeightAverage | None = None

    def save(self, step: int, keep: int) -> None:
        """Checkpoint ``step``: every process hands its RNG state to rank 0, which writes."""
        rng = gather_object([capture_rng_state()])
        if self.accelerator.is_main_process:
            epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
            state = {
                "epoch": epoch,
                "step_in_epoch": in_epoch,
                "fingerprint": self.fingerprint,
                "total_steps": self.total_steps,
                "world_size": self.accelerator.num_processes,
            }
            save_checkpoint(
                self.checkpoint_dir, step, model=self.raw_model, optimizer=self.optimizer,
                scheduler=self.scheduler, rng_states=rng, state=state,
                average=self.average.state_dict() if self.average is not None else None,
            )  # fmt: skip
            prune_checkpoints(self.checkpoint_dir, keep, self.fingerprint)
        self.accelerator.wait_for_everyone()


def _start(
    model: nn.Module, num_samples: int, params: TrainParams, run_dir: Path, fingerprint: str,
    lr_scales: Mapping[str, float] | None = None, ema_decay: float | None = None,
) -> _Run:
    """Seed, build optimizer and schedule, prepare for the processes, resume if possible."""
    accelerator = make_accelerator(params)
    rank = accelerator.process_index
    plan = DataPlan(num_samples, params.batch_size, accelerator.num_processes, params.grad_accum, params.seed, params.shuffle)
    total = params.max_steps or params.epochs * plan.steps_per_epoch
    seed_everything(params.seed + rank)
    optimizer = build_optimizer(model, params, lr_scales)
    scheduler = build_scheduler(optimizer, total, num_warmup_steps(params, total))
    wrapped, prepared_optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(wrapped)
    fp = run_fingerprint(params, num_samples, fingerprint)
    ckpt = load_latest_checkpoint(run_dir / "checkpoints", fp)
    average = WeightAverage(raw, ema_decay) if ema_decay is not None else None
    if ckpt is not None:
        if accelerator.is_main_process:
            log.info("resuming %s from its checkpoint at step %d of %d", run_dir, ckpt.step, total)
        kept = restore_checkpoint(
            ckpt, model=raw, optimizer=optimizer, scheduler=scheduler, rank=rank, device=accelerator.device
        )
        if average is not None:
            if kept is None:  # the fingerprint names ema_decay, so this is a damaged checkpoint
                raise InputError(ckpt.path, "has no averaged weights, but the run averages (ema_decay)")
            average.load_state_dict(kept, ckpt.path)
    accelerator.wait_for_everyone()
    return _Run(
        accelerator=accelerator, plan=plan, total_steps=total, model=wrapped, raw_model=raw,
        optimizer=optimizer, prepared_optimizer=prepared_optimizer, scheduler=scheduler,
        checkpoint_dir=run_dir / "checkpoints", fingerprint=fp,
        start_step=ckpt.step if ckpt else 0, resumed_from=ckpt.step if ckpt else None, average=average,
    )  # fmt: skip


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_dataset: Sequence,
    collate_fn: Callable[[list[Any]], Any] | None,
    params: TrainParams,
    run_dir: str | Path,
    *,
    eval_fn: EvalFn | None = None,
    live: Any = None,
    live_dir: str | Path | None = None,
    fingerprint: str = "",
    on_step_end: StepHook | None = None,
    lr_scales: Mapping[str, float] | None = None,
    ema_decay: float | None = None,
) -> TrainResult:
    """Train ``model`` in place; resume from ``run_dir/checkpoints`` when a matching one exists.

    - ``loss_fn(model, batch) -> {"loss": total, name: part, ...}`` on the collated batch;
    - ``eval_fn(model, step) -> {metric: value}`` (unwrapped model, eval mode, no grad), on
      every process; logged as ``eval/<metric>`` by rank 0;
    - ``live``: a ``dvclive.Live`` to log into (rank 0); without one, fit creates
      ``Live(live_dir or run_dir/"live", dvcyaml=False)`` on rank 0, resuming its history
      (minus rows after the checkpoint) when the run resumes: prefer this under DVC;
    - ``fingerprint``: the caller's description of model and data (e.g. model params JSON):
      a checkpoint of other settings is never resumed;
    - ``on_step_end(step, values)``: called after each optimizer step (after its checkpoint)
      with this process's losses, lr and grad_norm of that step, e.g. to stop a run (raise);
    - ``lr_scales``: parameter-name prefix -> factor of ``params.lr`` for those parameters
      (:func:`vlpipe.train.optim.param_groups`); part of the checkpoint fingerprint;
    - ``ema_decay``: keep an exponential moving average of the trained weights
      (:class:`WeightAverage`); ``eval_fn`` sees the average, and the returned model holds it
      (the last iterate is not kept). Part of the checkpoint fingerprint.

    Writes ``run_dir/checkpoints/step_*``, the DVCLive dir and
    ``run_dir/tensorboard`` (rank 0 only). Losses are logged as ``train/<name>``.
    """
    run_dir = Path(run_dir)
    if lr_scales:
        fingerprint = f"{fingerprint} lr_scales={sorted(lr_scales.items())}"
    if ema_decay is not None:
        fingerprint = f"{fingerprint} ema_decay={ema_decay!r}"
    run = _start(model, len(train_dataset), params, run_dir, fingerprint, lr_scales, ema_decay)
    average = run.average
    acc, plan, total, step = run.accelerator, run.plan, run.total_steps, run.start_step
    result = TrainResult(model=run.raw_model, step=step, total_steps=total, resumed_from=run.resumed_from)
    live_dir = Path(live_dir) if live_dir is not None else run_dir / "live"
    logger = _Logger(live, live_dir, run_dir / "tensorboard", acc.is_main_process, step)
    show = acc.is_main_process and sys.stderr.isatty()
    progress = tqdm(total=total, initial=step, desc="train", unit="step", disable=not show)
    started, last_eval = time.perf_counter(), -1
    window: list[dict[str, torch.Tensor]] = []
    run.model.train()
    try:
        while step < total:
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            batches = _epoch_batches(train_dataset, collate_fn, plan, epoch, acc.process_index, in_epoch, params.num_workers)
            for _ in range(min(plan.steps_per_epoch - in_epoch, total - step)):
                current = _optimizer_step(
                    run.model, loss_fn, batches, run.prepared_optimizer, run.scheduler, acc, params
                )
                window.append(current)
                step += 1
                if average is not None:
                    average.update(run.raw_model, step)
                progress.update(1)
                if step % params.log_every == 0 or step == total:
                    result.losses, window = _mean_over_processes(acc, window), []
                    logger.log(step, {f"train/{k}": v for k, v in result.losses.items()} | {"train/epoch": epoch})
                    progress.set_postfix(loss=f"{result.losses['loss']:.4f}")
                if eval_fn is not None and params.eval_every and step % params.eval_every == 0:
                    result.eval_metrics, last_eval = _evaluate(run.raw_model, eval_fn, step, average), step
                    logger.log(step, {f"eval/{k}": v for k, v in result.eval_metrics.items()})
                if step % params.checkpoint_every == 0 or step == total:
                    run.save(step, params.keep_checkpoints)
                if on_step_end is not None:
                    on_step_end(step, {k: float(v) for k, v in current.items()})
        if average is not None:  # what the run delivers: the averaged weights
            average.copy_to(run.raw_model)
        if eval_fn is not None and last_eval != step:
            result.eval_metrics = _evaluate(run.raw_model, eval_fn, step)
            logger.log(step, {f"eval/{k}": v for k, v in result.eval_metrics.items()})
    finally:
        progress.close()
        logger.close()
    result.step = step
    result.train_seconds = time.perf_counter() - started
    result.samples_per_second = (step - run.start_step) * params.batch_size / max(result.train_seconds, 1e-9)
    return result
