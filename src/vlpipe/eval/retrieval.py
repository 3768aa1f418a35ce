"""Image-text retrieval metrics as reported by ALBEF / X-VLM (formats.md §3).

- ``txt_r{1,5,10}`` (image -> text): for each image, is *any* of its captions among the
  top k texts?
- ``img_r{1,5,10}`` (text -> image): for each caption, is its image among the top k images?
- ``r_mean``: the mean of the six recalls (``txt_r_mean``, ``img_r_mean``: of each three).

Recalls are fractions in [0, 1]. Ties are broken by index (a stable sort), so the numbers are
the same on every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KS = (1, 5, 10)


def _best_rank(order: torch.Tensor, positives: Sequence[int]) -> int:
    """0-based rank, in ``order`` (indices best first), of the best-ranked of ``positives``."""
    hits = torch.isin(order, torch.as_tensor(list(positives), dtype=order.dtype)).nonzero()
    return int(hits[0, 0]) if len(hits) else len(order)


def retrieval_ranks(
    scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, txt2img: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of the first correct answer of each query: ``(image ranks (I,), text ranks (T,))``.

    ``scores_i2t`` (I, T): higher = better text for the image; ``scores_t2i`` (T, I): higher =
    better image for the text; ``txt2img`` (T,): the image each caption belongs to.
    """
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be (T, I) = {(n_txt, n_img)}, got {tuple(scores_t2i.shape)}")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {n_txt} texts")
    img2txt: list[list[int]] = [[] for _ in range(n_img)]
    for t, i in enumerate(txt2img):
        img2txt[int(i)].append(t)
    order_i2t = torch.argsort(scores_i2t, dim=1, descending=True, stable=True)  # (I, T)
    order_t2i = torch.argsort(scores_t2i, dim=1, descending=True, stable=True)  # (T, I)
    img_ranks = torch.tensor([_best_rank(order_i2t[i], img2txt[i]) for i in range(n_img)])
    txt_ranks = torch.tensor([_best_rank(order_t2i[t], [int(txt2img[t])]) for t in range(n_txt)])
    return img_ranks, txt_ranks


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Fraction of queries whose first correct answer is within the top ``k``."""
    return float((ranks < k).double().mean())


def recall_metrics(img_ranks: torch.Tensor, txt_ranks: torch.Tensor) -> dict[str, float]:
    """The six recalls, their per-direction means and ``r_mean`` from the 0-based rank of each
    image query's first correct caption (I,) and of each text query's image (T,)."""
    out = {f"txt_r{k}": recall_at_k(img_ranks, k) for k in KS}
    out |= {f"img_r{k}": recall_at_k(txt_ranks, k) for k in KS}
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in KS) / len(KS)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in KS) / len(KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def retrieval_metrics(
    scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, txt2img: Sequence[int]
) -> dict[str, float]:
    """``txt_r1/5/10``, ``img_r1/5/10``, their means and ``r_mean`` (see module docstring)."""
    return recall_metrics(*retrieval_ranks(scores_i2t, scores_t2i, txt2img))
