"""Shared primitives of the BERT-style models (LXMERT, X-LXMERT, VLP).

Only building blocks that several models use live here: the BERT prediction-head
transform, the tied masked-LM head, the two-layer answer classifier of LXMERT's QA head
and the BERT weight initialisation. Submodule and parameter names follow BERT
(Devlin et al. 2019) and LXMERT (Tan & Bansal 2019), so reference checkpoints map onto
them by renaming prefixes only (formats.md §6).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LAYER_NORM_EPS = 1e-12  # BERT's LayerNorm epsilon; the reference checkpoints were trained with it


class GeLU(nn.Module):
    """Exact (erf) GeLU as a module, so ``nn.Sequential`` indices match LXMERT's ``logit_fc``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class HeadTransform(nn.Module):
    """BERT's prediction-head transform: dense -> GeLU -> LayerNorm (names ``dense``, ``LayerNorm``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden)))


class MaskedLMHead(nn.Module):
    """BERT masked-LM head; ``decoder.weight`` is tied to the word embeddings.

    The decoder has no bias of its own: BERT keeps a separate output-only ``bias`` vector,
    which is what the reference checkpoints store (``cls.predictions.bias``).
    """

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        vocab_size, hidden_size = word_embeddings.weight.shape
        self.transform = HeadTransform(hidden_size)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: one tensor, two names
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # (B, L, H) -> (B, L, V)
        return self.decoder(self.transform(hidden)) + self.bias


class AnswerHead(nn.Module):
    """LXMERT's QA classifier ``logit_fc``: H -> 2H, GeLU, LayerNorm, 2H -> num_answers.

    Kept as an ``nn.Sequential`` so the parameter names are ``logit_fc.{0,2,3}.*`` exactly as
    in ``model_LXRT.pth`` and the fine-tuned ``BEST.pth`` files. ``in_dim`` differs from the
    hidden size for NLVR2 (two pooled vectors concatenated: 2H).
    """

    def __init__(self, in_dim: int, num_answers: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or 2 * in_dim
        self.logit_fc = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            GeLU(),
            nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS),
            nn.Linear(hidden_dim, num_answers),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # (B, in_dim) -> (B, num_answers)
        return self.logit_fc(pooled)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation: normal(0, std) weights, zero biases, unit LayerNorm.

    Apply with ``model.apply(partial(init_bert_weights, std=...))`` to freshly built heads.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
