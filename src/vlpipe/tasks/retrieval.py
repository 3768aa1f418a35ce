"""Image-text retrieval as X-VLM (and ALBEF) evaluate it, on the X-VLM retrieval files
(formats.md §5): rank every text for every image (and every image for every text) by the
ITC similarity, then re-score the top ``k`` candidates of each query with the ITM head
(Zeng et al. 2022, §4.2). A re-scored candidate's score is its ITM log-odds plus its ITC
logit (similarity / temperature), as ALBEF adds the ITC similarity to the ITM score: the sum
of the two heads' logits, so neither head alone decides. Metrics: ``txt_r1/5/10`` (image -> text, any of the image's
captions counts), ``img_r1/5/10`` and ``r_mean`` (:mod:`vlpipe.eval.retrieval`).

The leaderboard file ``{split}_rank.json`` holds, for each image, its top-10 caption indices
and, for each caption, its top-10 images (captions are numbered in file order, images by
their ``image`` path); :func:`score_ranking` recomputes the recalls from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from vlpipe.data.examples import Example
from vlpipe.data.formats.retrieval import read_retrieval
from vlpipe.errors import InputError
from vlpipe.eval.retrieval import KS, recall_metrics, retrieval_metrics
from vlpipe.io import read_json, write_json

TOP_SAVED = max(KS)  # candidates per query written to the leaderboard file
OUTSIDE_TOP_K = 1e4  # ITC scores outside the re-scored top k are pushed below every ITM score


def image_key(record: Mapping[str, Any]) -> str:
    """The img_id of a record: the stem of its ``image`` path (``images/<img_id>.png``)."""
    return Path(record["image"]).stem


@dataclass(frozen=True)
class RetrievalSplit:
    """A val/test split: I images, T captions and the image of every caption."""

    images: list[str]  # (I,) img_ids
    texts: list[str]  # (T,)
    txt2img: list[int]  # (T,) index into images

    @classmethod
    def read(cls, path: Path, max_images: int | None = None) -> RetrievalSplit:
        """Read a val/test file; ``max_images``: keep only its first images (quick metrics)."""
        images, texts, txt2img = [], [], []
        for record in read_retrieval(path, train=False)[:max_images]:
            images.append(image_key(record))
            for caption in record["caption"]:
                texts.append(caption)
                txt2img.append(len(images) - 1)
        return cls(images, texts, txt2img)


def train_examples(path: Path) -> list[Example]:
    """One example per training caption; ``target`` numbers its image (ITC positives)."""
    records = read_retrieval(path, train=True)
    index = {img: i for i, img in enumerate(sorted({image_key(r) for r in records}))}
    return [
        Example(key=n, img_ids=(image_key(r),), sent=r["caption"], target=index[image_key(r)])
        for n, r in enumerate(records)
    ]


class RetrievalModel(Protocol):
    """What ranking needs of a model (:class:`vlpipe.models.xvlm.Xvlm` has it)."""

    def embed_image(self, pixel_values: torch.Tensor) -> Any: ...
    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any: ...
    def match_logits(self, visual: Any, text: Any, rows: torch.Tensor | None = None) -> torch.Tensor: ...
    def clamped_temp(self) -> torch.Tensor: ...


@dataclass
class _Encoded:
    """Both towers' outputs of a split, kept for ITM re-scoring."""

    image_tokens: torch.Tensor  # (I, T_v, Dv)
    image_feat: torch.Tensor  # (I, E)
    text_ids: torch.Tensor  # (T, L)
    text_mask: torch.Tensor  # (T, L)
    text_hidden: torch.Tensor  # (T, L, H)
    text_feat: torch.Tensor  # (T, E)


def _encode(model: Any, split: RetrievalSplit, visual: Callable, tokenizer: Any, max_length: int,
            batch_size: int) -> _Encoded:  # fmt: skip
    tokens, img_feat = [], []
    for start in range(0, len(split.images), batch_size):
        out = model.embed_image(visual(split.images[start : start + batch_size])["pixel_values"])
        tokens.append(out.tokens)
        img_feat.append(out.feat)
    # One padding length for all texts, so their states concatenate into one tensor.
    text = tokenizer(split.texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    hidden, txt_feat = [], []
    for start in range(0, len(split.texts), batch_size):
        sl = slice(start, start + batch_size)
        out = model.embed_text(text["input_ids"][sl], text["attention_mask"][sl])
        hidden.append(out.hidden)
        txt_feat.append(out.feat)
    return _Encoded(torch.cat(tokens), torch.cat(img_feat), text["input_ids"], text["attention_mask"],
                    torch.cat(hidden), torch.cat(txt_feat))  # fmt: skip


def _match_scores(model: Any, enc: _Encoded, img_idx: torch.Tensor, txt_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """ITM log-odds of the (image, text) pairs ``img_idx[j], txt_idx[j]`` -> (P,)."""
    from vlpipe.models.xvlm import TextBatch, VisualBatch

    scores = []
    for start in range(0, len(img_idx), batch_size):
        i, t = img_idx[start : start + batch_size], txt_idx[start : start + batch_size]
        images, rows = torch.unique(i, return_inverse=True)  # each image's keys/values computed once
        tokens = enc.image_tokens[images]
        vis = VisualBatch(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), enc.image_feat[images])
        txt = TextBatch(enc.text_ids[t], enc.text_mask[t], enc.text_hidden[t], enc.text_feat[t])
        logits = model.match_logits(vis, txt, rows).float()  # (b, 2)
        scores.append(logits[:, 1] - logits[:, 0])
    return torch.cat(scores) if scores else torch.zeros(0)


def _rescore_top_k(
    sim: torch.Tensor, k: int, temp: float, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """(Q, C) ITC similarity -> scores where each query's top-k candidates carry ITM log-odds +
    ITC logit and the rest keep the ITC order below them."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # (Q, k)
    queries = torch.arange(sim.shape[0]).repeat_interleave(k)  # (Q*k,)
    itm = score_pairs(queries, top.reshape(-1)).view(-1, k)  # (Q, k)
    scores = sim.float() - OUTSIDE_TOP_K
    return scores.scatter(1, top, itm + sim.gather(1, top).float() / temp)


@torch.no_grad()
def rank_split(
    model: Any,
    split: RetrievalSplit,
    visual: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    tokenizer: Any,
    *,
    max_length: int,
    batch_size: int,
    k: int,
) -> dict[str, torch.Tensor]:
    """Scores of a split: ``itc_i2t`` (I, T), ``itc_t2i`` (T, I) and the ITM re-scored
    ``i2t`` / ``t2i`` (top ``k`` of each query re-scored by ITM; ``k`` = 0: ITC only)."""
    was_training = model.training
    model.eval()
    enc = _encode(model, split, visual, tokenizer, max_length, batch_size)
    sim = enc.image_feat @ enc.text_feat.t()  # (I, T)
    i2t, t2i = sim, sim.t()
    if k > 0:
        temp = float(model.clamped_temp())
        i2t = _rescore_top_k(sim, k, temp, lambda q, c: _match_scores(model, enc, q, c, batch_size))
        t2i = _rescore_top_k(sim.t(), k, temp, lambda q, c: _match_scores(model, enc, c, q, batch_size))
    model.train(was_training)
    return {"itc_i2t": sim, "itc_t2i": sim.t(), "i2t": i2t, "t2i": t2i}


def split_metrics(scores: Mapping[str, torch.Tensor], split: RetrievalSplit) -> dict[str, float]:
    """Recalls after ITM re-scoring, plus the ITC-only recalls under ``itc_*``."""
    out = retrieval_metrics(scores["i2t"], scores["t2i"], split.txt2img)
    itc = retrieval_metrics(scores["itc_i2t"], scores["itc_t2i"], split.txt2img)
    return out | {f"itc_{k}": v for k, v in itc.items()}


# ------------------------------------------------------------------ leaderboard file


def write_ranking(path: Path, scores: Mapping[str, torch.Tensor], split: RetrievalSplit) -> None:
    """``{"i2t": {img_id: [caption index, ...]}, "t2i": [[img_id, ...], ...]}``, top 10, best first."""
    n = min(TOP_SAVED, len(split.texts))
    i2t = scores["i2t"].topk(n, dim=1).indices.tolist()
    t2i = scores["t2i"].topk(min(TOP_SAVED, len(split.images)), dim=1).indices.tolist()
    ranking = {
        "i2t": {img: row for img, row in zip(split.images, i2t, strict=True)},
        "t2i": [[split.images[j] for j in row] for row in t2i],
    }
    write_json(path, ranking, indent=None)


def _rank_in(row: Sequence[Any], positives: set, path: Path, what: str) -> int:
    if not isinstance(row, list):
        raise InputError(path, f"{what}: expected a list of candidates")
    hits = [r for r, c in enumerate(row) if c in positives]
    return hits[0] if hits else len(row) + TOP_SAVED  # absent: beyond every recall@k


def score_ranking(path: Path, split: RetrievalSplit) -> dict[str, float]:
    """Recalls of a leaderboard ranking file against a split's captions."""
    data = read_json(path)
    if not isinstance(data, dict) or set(data) != {"i2t", "t2i"}:
        raise InputError(path, "expected an object with keys 'i2t' and 't2i'")
    i2t, t2i = data["i2t"], data["t2i"]
    if not isinstance(i2t, dict) or set(i2t) != set(split.images):
        raise InputError(path, f"'i2t' must rank captions for each of the {len(split.images)} images")
    if not isinstance(t2i, list) or len(t2i) != len(split.texts):
        raise InputError(path, f"'t2i' must hold one list per caption ({len(split.texts)})")
    captions_of: dict[str, set[int]] = {img: set() for img in split.images}
    for t, i in enumerate(split.txt2img):
        captions_of[split.images[i]].add(t)
    img_ranks = torch.tensor([_rank_in(i2t[img], captions_of[img], path, f"i2t[{img}]") for img in split.images])
    txt_ranks = torch.tensor(
        [_rank_in(row, {split.images[split.txt2img[t]]}, path, f"t2i[{t}]") for t, row in enumerate(t2i)]
    )
    return recall_metrics(img_ranks, txt_ranks)
