"""Optimizers and the learning-rate schedule of the training loop.

- AdamW (Loshchilov & Hutter 2019), torch's implementation, bias-corrected;
- BertAdam, the optimizer of BERT's original release that LXMERT (Tan & Bansal 2019)
  pre-trains and fine-tunes with: Adam moments *without* bias correction and decoupled
  weight decay added to the update;
- linear warmup then linear decay to zero (both references).

Weight decay never applies to biases or LayerNorm parameters (BERT's convention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vlpipe.config import TrainParams


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, lr_scales: Mapping[str, float] | None = None
) -> list[dict]:
    """Decayed weights, and biases + LayerNorm parameters without decay; frozen ones left out.

    ``lr_scales`` maps a parameter-name prefix (e.g. ``"encoder.vision."``) to a factor of the
    base ``lr``: those parameters get their own two groups at ``lr * factor`` (a lower rate
    for a pre-trained part, as fine-tuning recipes with layer-wise rates use). The schedule
    multiplies every group's rate by the same factor. Shared (tied) parameters appear once,
    under the first name ``named_parameters`` gives.
    """
    scales = dict(lr_scales or {})
    if scales and lr is None:
        raise ValueError("lr_scales needs the base lr")
    no_decay_ids = {
        id(p) for module in model.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()
    }
    # (scale, decayed?) -> parameters; scale None = the base rate
    buckets: dict[tuple[float | None, bool], list[nn.Parameter]] = {(None, True): [], (None, False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for prefix, f in scales.items() if name.startswith(prefix)), None)
        decayed = not (name.endswith("bias") or id(p) in no_decay_ids)
        buckets.setdefault((scale, decayed), []).append(p)
    for prefix in scales:
        if not any(name.startswith(prefix) for name, _ in model.named_parameters()):
            raise ValueError(f"lr_scales: no parameter name starts with {prefix!r}")
    groups = []
    for (scale, decayed), ps in buckets.items():
        if scale is not None and not ps:
            continue
        group: dict = {"params": ps, "weight_decay": weight_decay if decayed else 0.0}
        if scale is not None:
            group["lr"] = lr * scale
        groups.append(group)
    return groups


class BertAdam(Optimizer):
    """Adam without bias correction, with decoupled weight decay (BERT's ``BertAdam``).

    Per parameter p with gradient g (t-th step):
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p - lr * (m / (sqrt(v) + eps) + wd * p)
    No ``1 - b^t`` correction, so early steps are smaller than Adam's; together with the
    warmup this is what LXMERT's recipe was tuned with. Gradient clipping is the loop's job.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid BertAdam settings lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                self._update(p, group, b1, b2)
        return loss

    def _update(self, p: torch.Tensor, group: dict, b1: float, b2: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = p.grad
        state["step"] += 1
        state["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        update = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])
        if group["weight_decay"] > 0:
            update = update + group["weight_decay"] * p
        p.add_(update, alpha=-group["lr"])


def build_optimizer(model: nn.Module, params: TrainParams, lr_scales: Mapping[str, float] | None = None) -> Optimizer:
    """AdamW or BertAdam over :func:`param_groups`, as ``params.optimizer`` says."""
    groups = param_groups(model, params.weight_decay, params.lr, lr_scales)
    betas = (params.beta1, params.beta2)
    if params.optimizer == "bertadam":
        return BertAdam(groups, lr=params.lr, betas=betas, eps=params.eps)
    return torch.optim.AdamW(groups, lr=params.lr, betas=betas, eps=params.eps)


def warmup_linear(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor for the update that follows ``step`` completed updates (0-based).

    Linear warmup to 1 over ``warmup_steps`` updates ((step + 1) / warmup), then linear
    decay that reaches 1 / (total - warmup) on the last update, so no update has lr 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def num_warmup_steps(params: TrainParams, total_steps: int) -> int:
    """``warmup_ratio`` of the run, rounded (LXMERT: 5%)."""
    return round(params.warmup_ratio * total_steps)


def build_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    """Warmup + linear decay (:func:`warmup_linear`); step it once per optimizer step."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must lie in [0, total_steps={total_steps}]")
    return LambdaLR(optimizer, partial(warmup_linear, total_steps=total_steps, warmup_steps=warmup_steps))
