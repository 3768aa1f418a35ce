"""VLP (Zhou et al., AAAI 2020): one transformer that encodes and decodes.

A BERT-style stack runs over ``[CLS] r_1 .. r_N [SEP] w_1 .. w_T [SEP]``. What it does is
decided only by the self-attention mask of each example (paper §3.2, after UniLM, Dong
et al. 2019):

- **bidirectional**: every position sees every (non-padding) position;
- **seq2seq**: the image segment ``[CLS] regions [SEP]`` sees only itself, and caption
  position t sees the image segment and the caption positions <= t.

Pre-training is masked-LM on caption tokens under either mask (per example, probability
``s2s_prob`` / ``bi_prob``); under the seq2seq mask a masked token is predicted from its left
context only, which is what captioning needs. Decoding appends a ``[MASK]`` after the words
generated so far and predicts it (UniLM's decoding); with key/value caching each step feeds
only the previous word (whose keys/values are kept) and the new ``[MASK]`` (whose are not).

Layout. Text arrives tokenized as BERT does it, ``input_ids`` = ``[CLS] w_1 .. w_T [SEP]
[PAD]..`` (B, L), the convention of every task collate. The model moves that ``[CLS]`` in
front of the regions and inserts the image ``[SEP]`` itself, so the sequence has
S = L + N + 1 positions and the caption starts at ``num_prefix = N + 2``. Word positions:
``[CLS]`` 0, image ``[SEP]`` 1, text index j >= 1 at position j + 1; regions carry no word
position but a box encoding (formats.md §1/§7): normalised x1, y1, x2, y2, relative area and
detector confidence (:func:`box_encoding`). Segment ids: 0 for the image segment, 1 for text.

Parameter names follow BERT (``bert.embeddings.*``, ``bert.encoder.layer.{i}.attention.self
.query`` ..., ``cls.predictions.*``), as the reference VLP (built on pytorch-pretrained-BERT)
does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig

from vlpipe.config import VlpModelParams
from vlpipe.io import atomic_dir, read_json
from vlpipe.models.layers import LAYER_NORM_EPS, MaskedLMHead, init_bert_weights
from vlpipe.models.lxmert import IGNORE_INDEX, mask_tokens

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_KEY = "cls.predictions.decoder.weight"  # same tensor as bert.embeddings.word_embeddings.weight
TIED_SOURCE = "bert.embeddings.word_embeddings.weight"
BOX_DIM = 6  # x1, y1, x2, y2, relative area, detector confidence


# --------------------------------------------------------------------------- config


def vlp_config(
    params: VlpModelParams,
    *,
    vocab_size: int,
    visual_feat_dim: int,
    cls_token_id: int,
    sep_token_id: int,
    mask_token_id: int,
    pad_token_id: int,
    feat_stats: tuple[list[float], list[float]] | None = None,
) -> BertConfig:
    """A transformers ``BertConfig`` carrying our sizes plus VLP's extra keys.

    The vocabulary and special-token ids come from the tokenizer, ``visual_feat_dim`` from the
    region store's meta.json. Extra keys (``visual_feat_dim``, ``visual_pos_dim``, token ids,
    ``max_text_length``, and with ``standardize_features`` the input statistics
    ``visual_feat_mean`` / ``visual_feat_std`` (D,) from ``feat_stats``) travel in config.json.
    """
    if params.standardize_features and feat_stats is None:
        raise ValueError("standardize_features needs feat_stats (mean, std) of the pre-training features")
    mean, std = feat_stats if params.standardize_features and feat_stats is not None else (None, None)
    return BertConfig(
        visual_feat_mean=mean,
        visual_feat_std=std,
        vocab_size=vocab_size,
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_attention_heads,
        intermediate_size=params.intermediate_size,
        hidden_dropout_prob=params.hidden_dropout_prob,
        attention_probs_dropout_prob=params.attention_probs_dropout_prob,
        max_position_embeddings=params.max_position_embeddings,
        type_vocab_size=2,
        initializer_range=params.initializer_range,
        layer_norm_eps=LAYER_NORM_EPS,
        pad_token_id=pad_token_id,
        cls_token_id=cls_token_id,
        sep_token_id=sep_token_id,
        mask_token_id=mask_token_id,
        visual_feat_dim=visual_feat_dim,
        visual_pos_dim=BOX_DIM,
        max_regions=params.max_regions,
        max_text_length=params.max_text_length,
        architectures=["VlpForPreTraining"],
    )


# -------------------------------------------------------------------------- visual


def box_encoding(boxes: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    """VLP's region position: normalised box, relative area and detector confidence.

    boxes (B, N, 4) x1y1x2y2 in [0, 1], conf (B, N) -> (B, N, 6).
    """
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)  # (B, N)
    return torch.cat([boxes, area[..., None], conf[..., None].to(boxes.dtype)], dim=-1)


class VlpVisual:
    """Wraps a region source (``vlpipe.data.visual.RegionInputs``) for VLP: the first
    ``max_regions`` boxes (stores list detections best first; None keeps all) and ``visual_pos``
    as VLP's 6-d box encoding. Any collate that passes ``visual_pos`` through (e.g.
    ``vlpipe.tasks.base.make_collate``) then feeds VLP correctly; build it with
    ``VlpVisual(RegionInputs(dir), config.max_regions)`` so a model always sees what it was
    trained on.
    """

    kind = "region"
    pos_dim = BOX_DIM

    def __init__(self, regions: Callable[[Sequence[str]], dict[str, torch.Tensor]], max_regions: int | None = None):
        self.regions = regions
        self.feat_dim = int(regions.feat_dim)  # type: ignore[attr-defined]
        stored = int(regions.num_boxes)  # type: ignore[attr-defined]
        self.num_boxes = stored if max_regions is None else min(stored, int(max_regions))

    def __call__(self, img_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {k: v[:, : self.num_boxes] for k, v in self.regions(img_ids).items()}  # (B, N, ...)
        out["visual_pos"] = box_encoding(out["visual_pos"], out["obj_conf"])  # (B, N, 6)
        return out


# --------------------------------------------------------------------------- masks


def seq2seq_mask(num_prefix: int, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(S, S) bool, True where query row may attend key column, for the seq2seq mask.

    Image segment rows (< num_prefix) see only the image segment; a caption row t sees the
    image segment and caption columns <= t.
    """
    idx = torch.arange(seq_len, device=device)
    key_in_prefix = idx[None, :] < num_prefix  # (1, S)
    causal_text = (idx[:, None] >= num_prefix) & (idx[None, :] <= idx[:, None])  # (S, S)
    return key_in_prefix | causal_text


def attention_allowed(s2s: torch.Tensor, key_valid: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, S, S) bool: per example the seq2seq mask (``s2s`` True) or the bidirectional one,
    and never a padding key. s2s (B,), key_valid (B, S)."""
    seq_len = key_valid.shape[1]
    s2s_pattern = seq2seq_mask(num_prefix, seq_len, key_valid.device)  # (S, S)
    pattern = s2s_pattern[None] | ~s2s.bool()[:, None, None]  # (B, S, S); bidirectional rows: all True
    return pattern & key_valid.bool()[:, None, :]


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Sq, Sk) bool -> (B, 1, Sq, Sk) additive bias: 0 where allowed, the dtype's minimum
    elsewhere (not -inf, so a row never turns into NaN)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------------------- cache


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, per layer (B, heads, S, head_dim),
    and which of those positions are valid keys (B, S)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def extend(self, new: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> KVCache:
        """A cache with the first ``count`` new positions of every layer appended (all valid)."""
        keys = [torch.cat([k, nk[:, :, :count]], dim=2) for k, (nk, _) in zip(self.keys, new, strict=True)]
        values = [torch.cat([v, nv[:, :, :count]], dim=2) for v, (_, nv) in zip(self.values, new, strict=True)]
        ones = torch.ones(self.valid.shape[0], count, dtype=torch.bool, device=self.valid.device)
        return KVCache(keys, values, torch.cat([self.valid, ones], dim=1))

    def select(self, index: torch.Tensor) -> KVCache:
        """Rows ``index`` of the batch (beam reordering / expansion)."""
        return KVCache(
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
            self.valid.index_select(0, index),
        )


# --------------------------------------------------------------------------- layers


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention that can attend to cached keys/values."""

    def __init__(self, config: BertConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # (B, S, H) -> (B, heads, S, head_dim)
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden (B, Sq, H); bias (B, 1, Sq, Sk) with Sk = past length + Sq. Returns the context
        (B, Sq, H) and the keys/values of the *new* positions (B, heads, Sq, head_dim)."""
        q = self._heads(self.query(hidden))
        k_new, v_new = self._heads(self.key(hidden)), self._heads(self.value(hidden))
        k = k_new if past is None else torch.cat([past[0], k_new], dim=2)  # (B, heads, Sk, d)
        v = v_new if past is None else torch.cat([past[1], v_new], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias  # (B, heads, Sq, Sk)
        probs = self.dropout(scores.softmax(dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(hidden.shape)  # (B, Sq, H)
        return ctx, (k_new, v_new)


class DenseResidual(nn.Module):
    """BERT's ``*.output``: dense -> dropout -> residual -> LayerNorm."""

    def __init__(self, in_dim: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """``attention.self`` + ``attention.output``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = DenseResidual(config.hidden_size, config)


class Intermediate(nn.Module):
    """BERT's ``intermediate``: dense to the FFN width, GeLU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """One post-LayerNorm BERT layer (self-attention, FFN)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseResidual(config.intermediate_size, config)

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        ctx, new_kv = self.attention.self(hidden, bias, past)
        hidden = self.attention.output(ctx, hidden)
        return self.output(self.intermediate(hidden), hidden), new_kv


class Encoder(nn.Module):
    """``encoder.layer.{i}``: the stack, optionally continuing from a :class:`KVCache`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        new_kv = []
        for i, layer in enumerate(self.layer):
            past = None if cache is None else (cache.keys[i], cache.values[i])
            hidden, kv = layer(hidden, bias, past)
            new_kv.append(kv)
        return hidden, new_kv


class RegionEmbedding(nn.Module):
    """Region feature and box encoding projected to the hidden size (VLP's ``vis_embed`` /
    ``vis_pe_embed``): LayerNorm(W_f f) and LayerNorm(W_b box), averaged as LXMERT does."""

    def __init__(self, config: BertConfig):
        super().__init__()
        hidden = config.hidden_size
        self.feat_fc = nn.Linear(config.visual_feat_dim, hidden)
        self.feat_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.box_fc = nn.Linear(config.visual_pos_dim, hidden)
        self.box_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        # (B, N, D), (B, N, 6) -> (B, N, H)
        return (self.feat_norm(self.feat_fc(feats)) + self.box_norm(self.box_fc(boxes))) / 2


class Embeddings(nn.Module):
    """Word + position + segment embeddings for text, region embedding + segment for regions."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.region = RegionEmbedding(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def text(self, ids: torch.Tensor, positions: torch.Tensor, segment: int) -> torch.Tensor:
        # ids (B, T), positions (T,) -> (B, T, H); LayerNorm is per position, so pieces embed alone
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[segment]
        return self.dropout(self.LayerNorm(x))

    def regions(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        # (B, N, D), (B, N, 6) -> (B, N, H), segment 0
        x = self.region(feats, boxes) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


def text_positions(start: int, count: int, device: torch.device) -> torch.Tensor:
    """Word positions of text indices start .. start + count - 1 (index j >= 1 sits at j + 1)."""
    return torch.arange(start, start + count, device=device) + 1


# -------------------------------------------------------------------------- backbone


class VlpBackbone(nn.Module):
    """``bert``: embeddings + the shared transformer stack (no pooler: VLP pools by product)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def prefix(self, visual_feats: torch.Tensor, visual_pos: torch.Tensor, cls_ids: torch.Tensor) -> torch.Tensor:
        """Embedded image segment ``[CLS] regions [SEP]`` (B, N + 2, H); cls_ids (B, 1)."""
        emb = self.embeddings
        device = cls_ids.device
        cls = emb.text(cls_ids, torch.zeros(1, dtype=torch.long, device=device), 0)  # (B, 1, H)
        sep_ids = torch.full_like(cls_ids, self.config.sep_token_id)
        sep = emb.text(sep_ids, torch.ones(1, dtype=torch.long, device=device), 0)  # (B, 1, H)
        return torch.cat([cls, emb.regions(visual_feats, visual_pos), sep], dim=1)

    def sequence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        visual_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded ``[CLS] regions [SEP] text`` (B, S, H) and key validity (B, S)."""
        b, n = visual_feats.shape[:2]
        prefix = self.prefix(visual_feats, visual_pos, input_ids[:, :1])  # (B, N + 2, H)
        text = self.embeddings.text(input_ids[:, 1:], text_positions(1, input_ids.shape[1] - 1, input_ids.device), 1)
        if visual_attention_mask is None:
            visual_attention_mask = torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
        sep_valid = torch.ones(b, 1, dtype=torch.bool, device=input_ids.device)
        valid = torch.cat(
            [attention_mask[:, :1].bool(), visual_attention_mask.bool(), sep_valid, attention_mask[:, 1:].bool()], dim=1
        )  # (B, S)
        return torch.cat([prefix, text], dim=1), valid

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        visual_attention_mask: torch.Tensor | None = None,
        s2s: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, S, H) of ``[CLS] regions [SEP] text``; ``s2s`` (B,) bool picks the
        seq2seq mask per example (None: bidirectional for all)."""
        hidden, valid = self.sequence(input_ids, attention_mask, visual_feats, visual_pos, visual_attention_mask)
        if s2s is None:
            s2s = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        allowed = attention_allowed(s2s, valid, num_prefix=visual_feats.shape[1] + 2)  # (B, S, S)
        return self.encoder(hidden, attention_bias(allowed, hidden.dtype))[0]


def text_hidden(hidden: torch.Tensor, num_regions: int) -> torch.Tensor:
    """States aligned with ``input_ids``: [CLS] (position 0) then the text segment. (B, S, H) -> (B, L, H)."""
    return torch.cat([hidden[:, :1], hidden[:, num_regions + 2 :]], dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, num_regions: int) -> torch.Tensor:
    """VLP's VQA representation: element-wise product of the final [CLS] and of the [SEP] that
    ends the question. hidden (B, S, H), attention_mask (B, L) -> (B, H)."""
    text = text_hidden(hidden, num_regions)  # (B, L, H)
    last = attention_mask.long().sum(dim=1) - 1  # (B,) index of the final [SEP]
    end = text[torch.arange(text.shape[0], device=text.device), last]  # (B, H)
    return text[:, 0] * end


# ----------------------------------------------------------------------------- model


class VlpHeads(nn.Module):
    """``cls``: the masked-LM head, its decoder tied to the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MaskedLMHead(word_embeddings)


@dataclass
class VlpOutput:
    """One forward pass. L text length, V vocab, H hidden, T scored caption length.

    - ``text_hidden`` (B, L, H) and ``mlm_logits`` (B, L, V), aligned with ``input_ids``;
    - ``pooled`` (B, H): [CLS] x final [SEP] (meaningful under the bidirectional mask);
    - ``token_log_probs`` (B, T): log p(w_t | image, w_<t) when ``caption_tokens`` were scored;
    - ``losses``: ``mlm_s2s`` / ``mlm_bi`` (mean cross-entropy over the masked tokens of the
      examples under each mask; 0 when there are none) and ``loss``, the mean over all masked
      tokens (the token-weighted mix of the two).
    """

    text_hidden: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    token_log_probs: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class Vlp(nn.Module):
    """VLP with its masked-LM head: ``bert`` (:class:`VlpBackbone`) and ``cls.predictions``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = VlpBackbone(config)
        self.cls = VlpHeads(self.bert.embeddings.word_embeddings)
        self.apply(partial(init_bert_weights, std=config.initializer_range))
        nn.init.zeros_(self.cls.predictions.bias)

    def tie_weights(self) -> None:
        """Re-tie the MLM decoder to the word embeddings (after loading a state dict)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        *,
        s2s: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        caption_tokens: torch.Tensor | None = None,
    ) -> VlpOutput:
        """Either encode text (``input_ids`` (B, L), ``attention_mask``; per-example mask from
        ``s2s`` (B,) bool, None = bidirectional; MLM losses when ``mlm_labels`` (B, L) with -100
        on unmasked tokens are given), or score ``caption_tokens`` (B, T) left to right
        (:meth:`score_captions`). visual_feats (B, N, D), visual_pos (B, N, 6)."""
        if caption_tokens is not None:
            return VlpOutput(token_log_probs=self.score_captions(visual_feats, visual_pos, caption_tokens, visual_attention_mask))
        if input_ids is None or attention_mask is None:
            raise ValueError("Vlp.forward needs input_ids and attention_mask, or caption_tokens")
        n = visual_feats.shape[1]
        hidden = self.bert(input_ids, attention_mask, visual_feats, visual_pos, visual_attention_mask, s2s)
        text = text_hidden(hidden, n)  # (B, L, H)
        out = VlpOutput(text_hidden=text, mlm_logits=self.cls.predictions(text), pooled=pool(hidden, attention_mask, n))
        if mlm_labels is not None:
            if s2s is None:
                s2s = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            out.losses = mlm_losses(out.mlm_logits, mlm_labels, s2s)
        return out

    # ------------------------------------------------------------------ decoding

    def encode_prefix(
        self, visual_feats: torch.Tensor, visual_pos: torch.Tensor, visual_attention_mask: torch.Tensor | None = None
    ) -> KVCache:
        """Run the image segment once; its keys/values start the decoding cache.

        Under the seq2seq mask the image segment never sees text, so these states are the same
        at every decoding step.
        """
        b, n = visual_feats.shape[:2]
        device = visual_feats.device
        cls_ids = torch.full((b, 1), self.config.cls_token_id, dtype=torch.long, device=device)
        hidden = self.bert.prefix(visual_feats, visual_pos, cls_ids)  # (B, N + 2, H)
        valid = torch.ones(b, n + 2, dtype=torch.bool, device=device)
        if visual_attention_mask is not None:
            valid[:, 1 : n + 1] = visual_attention_mask.bool()
        allowed = valid[:, None, :].expand(b, n + 2, n + 2)
        _, new_kv = self.bert.encoder(hidden, attention_bias(allowed, hidden.dtype))
        return KVCache([k for k, _ in new_kv], [v for _, v in new_kv], valid)

    def decode_step(self, cache: KVCache, token_ids: torch.Tensor, start: int) -> tuple[torch.Tensor, KVCache]:
        """Feed text tokens at text indices start .. start + k - 1 after the cached positions.

        token_ids (B, k); each new token sees the cache and the new tokens up to itself
        (seq2seq mask). Returns the MLM logits of the new tokens (B, k, V) and the cache
        extended by the first k - 1 of them (the last one is the [MASK] being predicted, whose
        keys/values are never reused).
        """
        b, k = token_ids.shape
        x = self.bert.embeddings.text(token_ids, text_positions(start, k, token_ids.device), 1)  # (B, k, H)
        causal = torch.ones(k, k, dtype=torch.bool, device=x.device).tril()  # (k, k)
        allowed = torch.cat([cache.valid[:, None, :].expand(b, k, cache.length), causal.expand(b, k, k)], dim=2)
        hidden, new_kv = self.bert.encoder(x, attention_bias(allowed, x.dtype), cache)
        return self.cls.predictions(hidden), cache.extend(new_kv, k - 1)

    def score_captions(
        self,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        caption_tokens: torch.Tensor,
        visual_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(w_t | image, w_<t) for every t in one pass, exactly as decoding computes it.

        The sequence is the image segment, the words w_1..w_T, then one [MASK] per word: [MASK]
        t sits at w_t's position and sees the image segment, w_<t and itself; word t sees the
        image segment and w_<=t (what the cache holds when decoding). caption_tokens (B, T)
        (the caption and its final [SEP]; what follows is ignored by the caller) -> (B, T).
        """
        b, t = caption_tokens.shape
        n = visual_feats.shape[1]
        device = caption_tokens.device
        cls_ids = torch.full((b, 1), self.config.cls_token_id, dtype=torch.long, device=device)
        positions = text_positions(1, t, device)
        masks = torch.full_like(caption_tokens, self.config.mask_token_id)
        x = torch.cat([
            self.bert.prefix(visual_feats, visual_pos, cls_ids),
            self.bert.embeddings.text(caption_tokens, positions, 1),
            self.bert.embeddings.text(masks, positions, 1),
        ], dim=1)  # (B, N + 2 + 2T, H)
        allowed = _scoring_mask(n + 2, t, device).expand(b, -1, -1).clone()
        if visual_attention_mask is not None:
            allowed[:, :, 1 : n + 1] &= visual_attention_mask.bool()[:, None, :]
        hidden, _ = self.bert.encoder(x, attention_bias(allowed, x.dtype))
        logits = self.cls.predictions(hidden[:, n + 2 + t :])  # (B, T, V) at the [MASK]s
        return logits.float().log_softmax(dim=-1).gather(-1, caption_tokens[..., None]).squeeze(-1)


def _scoring_mask(num_prefix: int, t: int, device: torch.device) -> torch.Tensor:
    """(1, S, S) bool for :meth:`Vlp.score_captions`, S = num_prefix + 2T."""
    p = num_prefix
    size = p + 2 * t
    allowed = torch.zeros(size, size, dtype=torch.bool, device=device)
    allowed[:, :p] = True  # everyone sees the image segment; image rows see nothing else
    allowed[:p, p:] = False
    words = torch.ones(t, t, dtype=torch.bool, device=device)
    allowed[p : p + t, p : p + t] = words.tril()  # word i sees words <= i
    allowed[p + t :, p : p + t] = words.tril(diagonal=-1)  # [MASK] i sees words < i
    allowed[p + t :, p + t :] = torch.eye(t, dtype=torch.bool, device=device)  # and itself
    return allowed[None]


class VlpEncoder(nn.Module):
    """VLP as a task encoder: ``encoder(**inputs) -> pooled (B, H)`` under the bidirectional mask.

    What understanding tasks (VQA) sit on, as in VLP: [CLS] x final [SEP]. Inputs are what
    ``vlpipe.tasks.base.make_collate`` gives with a :class:`VlpVisual` source; ``token_type_ids``
    is accepted and ignored (VLP sets segments by layout).
    """

    def __init__(self, bert: VlpBackbone):
        super().__init__()
        self.bert = bert

    @property
    def config(self) -> BertConfig:
        return self.bert.config

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def max_text_length(self) -> int:
        return int(self.bert.config.max_text_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # (B, L) text and (B, N, D), (B, N, 6) regions -> (B, H)
        hidden = self.bert(input_ids, attention_mask, visual_feats, visual_pos, visual_attention_mask)
        return pool(hidden, attention_mask, visual_feats.shape[1])


# ---------------------------------------------------------------------------- losses


def mlm_losses(logits: torch.Tensor, labels: torch.Tensor, s2s: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mlm_s2s``, ``mlm_bi`` (mean CE over masked tokens of each mask's examples, 0 if none)
    and ``loss`` (mean over all masked tokens). logits (B, L, V), labels (B, L), s2s (B,)."""
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)  # (B, L), 0 where ignored
    masked = labels != IGNORE_INDEX
    s2s_rows = s2s.bool()[:, None]
    losses = {}
    for name, rows in (("mlm_s2s", s2s_rows), ("mlm_bi", ~s2s_rows)):
        sel = masked & rows
        losses[name] = (per_token * sel).sum() / sel.sum().clamp(min=1)
    losses["loss"] = per_token.sum() / masked.sum().clamp(min=1)
    return losses


def mask_caption_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (``prob`` of the tokens; of those 80% [MASK], 10% random, 10% kept) of caption
    tokens: every text token after [CLS] including the final [SEP] (so the decoder learns where
    to stop), never padding. input_ids, attention_mask (B, L) -> (masked ids, labels (B, L))."""
    maskable = attention_mask.bool().clone()  # (B, L)
    maskable[:, 0] = False  # [CLS] becomes the image segment's first token
    return mask_tokens(
        input_ids, maskable, mask_token_id=mask_token_id, vocab_size=vocab_size, prob=prob,
        mask_frac=mask_frac, random_frac=random_frac, generator=generator,
    )  # fmt: skip


def sample_s2s(batch_size: int, s2s_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool: which examples use the seq2seq mask (the others the bidirectional one)."""
    return torch.rand(batch_size, generator=generator) < s2s_prob


# -------------------------------------------------------------------------- decoding


class IncrementalDecoder:
    """Left-to-right decoding state of a batch (UniLM / VLP style).

    Step t predicts a [MASK] at caption index t that sees the image and w_<t. With ``use_cache``
    the image segment is encoded once and every step feeds only [w_{t-1}, MASK]; without it each
    step re-encodes the whole sequence (the slow reference the cache must reproduce).
    """

    def __init__(
        self,
        model: Vlp,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        visual_attention_mask: torch.Tensor | None = None,
        *,
        use_cache: bool = True,
    ):
        self.model = model
        self.visual = {"visual_feats": visual_feats, "visual_pos": visual_pos,
                       "visual_attention_mask": visual_attention_mask}  # fmt: skip
        self.tokens = torch.zeros(visual_feats.shape[0], 0, dtype=torch.long, device=visual_feats.device)  # (B, t)
        self.cache = model.encode_prefix(**self.visual) if use_cache else None

    def next_logits(self) -> torch.Tensor:
        """(B, V) logits of the next caption token."""
        cfg = self.model.config
        b, t = self.tokens.shape
        mask = torch.full((b, 1), cfg.mask_token_id, dtype=torch.long, device=self.tokens.device)
        if self.cache is not None:
            new = mask if t == 0 else torch.cat([self.tokens[:, -1:], mask], dim=1)  # (B, 1 or 2)
            logits, self.cache = self.model.decode_step(self.cache, new, start=t if t else 1)
            return logits[:, -1]
        cls = torch.full((b, 1), cfg.cls_token_id, dtype=torch.long, device=self.tokens.device)
        ids = torch.cat([cls, self.tokens, mask], dim=1)  # (B, t + 2)
        s2s = torch.ones(b, dtype=torch.bool, device=ids.device)
        return self.model(**self.visual, input_ids=ids, attention_mask=torch.ones_like(ids), s2s=s2s).mlm_logits[:, -1]

    def push(self, tokens: torch.Tensor) -> None:
        """Append the chosen tokens (B,)."""
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.tokens = self.tokens.index_select(0, index)
        if self.cache is not None:
            self.cache = self.cache.select(index)
        self.visual = {k: None if v is None else v.index_select(0, index) for k, v in self.visual.items()}


def banned_token_ids(config: BertConfig) -> list[int]:
    """Tokens a caption never contains: [PAD], [CLS], [MASK]."""
    return [config.pad_token_id, config.cls_token_id, config.mask_token_id]


def _check_length(config: BertConfig, max_length: int) -> None:
    """Caption index t sits at word position t + 1: it must exist in the position table."""
    longest = config.max_position_embeddings - 2
    if max_length > longest:
        raise ValueError(f"max_length {max_length} exceeds what the position table allows ({longest})")


def _log_probs(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    logits = logits.float().clone()  # (B, V)
    logits[:, banned] = float("-inf")
    return logits.log_softmax(dim=-1)


def strip_caption(tokens: Sequence[int], sep_token_id: int) -> list[int]:
    """The caption tokens before the first [SEP]."""
    out = []
    for tok in tokens:
        if tok == sep_token_id:
            break
        out.append(int(tok))
    return out


@torch.no_grad()
def greedy_decode(
    model: Vlp,
    visual_feats: torch.Tensor,
    visual_pos: torch.Tensor,
    visual_attention_mask: torch.Tensor | None = None,
    *,
    max_length: int,
    use_cache: bool = True,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy (or, with ``sample``, multinomial) decoding. Returns (B, T<=max_length) token ids:
    each row's caption, its [SEP] and [PAD] after it (or max_length tokens without [SEP])."""
    cfg = model.config
    _check_length(cfg, max_length)
    dec = IncrementalDecoder(model, visual_feats, visual_pos, visual_attention_mask, use_cache=use_cache)
    done = torch.zeros(visual_feats.shape[0], dtype=torch.bool, device=visual_feats.device)
    banned = banned_token_ids(cfg)
    for _ in range(max_length):
        logp = _log_probs(dec.next_logits(), banned)  # (B, V)
        tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0] if sample else logp.argmax(dim=-1)
        tok = torch.where(done, torch.full_like(tok, cfg.pad_token_id), tok)
        dec.push(tok)
        done |= tok == cfg.sep_token_id
        if bool(done.all()):
            break
    return dec.tokens


@torch.no_grad()
def beam_search(
    model: Vlp,
    visual_feats: torch.Tensor,
    visual_pos: torch.Tensor,
    visual_attention_mask: torch.Tensor | None = None,
    *,
    beam_size: int,
    max_length: int,
    length_penalty: float = 0.0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Beam search; returns each example's best caption (token ids before [SEP]).

    A beam that emitted [SEP] is finished: it keeps its score and continues only with [PAD] at
    no cost, competing with the open beams. The best of the final beams maximises
    log-prob / length**length_penalty (length counts the [SEP]).
    """
    cfg = model.config
    _check_length(cfg, max_length)
    b, k = visual_feats.shape[0], beam_size
    rows = torch.arange(b, device=visual_feats.device).repeat_interleave(k)  # (B*K,)
    vmask = None if visual_attention_mask is None else visual_attention_mask[rows]
    dec = IncrementalDecoder(model, visual_feats[rows], visual_pos[rows], vmask, use_cache=use_cache)
    scores = torch.full((b, k), float("-inf"), device=visual_feats.device)
    scores[:, 0] = 0.0  # start from one live beam per example, not k copies of it
    finished = torch.zeros(b * k, dtype=torch.bool, device=visual_feats.device)
    lengths = torch.zeros(b * k, device=visual_feats.device)
    banned = banned_token_ids(cfg)
    for _ in range(max_length):
        logp = _log_probs(dec.next_logits(), banned)  # (B*K, V)
        vocab = logp.shape[-1]
        logp[finished] = float("-inf")
        logp[finished, cfg.pad_token_id] = 0.0
        top, flat = (scores.view(-1, 1) + logp).view(b, k * vocab).topk(k, dim=-1)  # (B, K)
        source = (torch.arange(b, device=flat.device)[:, None] * k + flat // vocab).view(-1)  # (B*K,)
        tok = (flat % vocab).view(-1)
        dec.reorder(source)
        finished, lengths = finished[source], lengths[source] + (~finished[source]).float()
        finished = finished | (tok == cfg.sep_token_id)
        dec.push(tok)
        scores = top
        if bool(finished.all()):
            break
    final = scores.view(-1) / lengths.clamp(min=1) ** length_penalty  # (B*K,)
    best = final.view(b, k).argmax(dim=-1) + torch.arange(b, device=final.device) * k  # (B,)
    return [strip_caption(dec.tokens[i].tolist(), cfg.sep_token_id) for i in best.tolist()]


def decode(
    model: Vlp,
    visual_feats: torch.Tensor,
    visual_pos: torch.Tensor,
    visual_attention_mask: torch.Tensor | None = None,
    *,
    beam_size: int,
    max_length: int,
    length_penalty: float = 0.0,
) -> list[list[int]]:
    """Captions as token ids (before [SEP]): greedy for ``beam_size`` 1, beam search otherwise."""
    if beam_size == 1:
        tokens = greedy_decode(model, visual_feats, visual_pos, visual_attention_mask, max_length=max_length)
        return [strip_caption(row, model.config.sep_token_id) for row in tokens.tolist()]
    return beam_search(
        model, visual_feats, visual_pos, visual_attention_mask,
        beam_size=beam_size, max_length=max_length, length_penalty=length_penalty,
    )  # fmt: skip


# ------------------------------------------------------------------------ save/load


def build_vlp(
    params: VlpModelParams,
    *,
    vocab_size: int,
    visual_feat_dim: int,
    cls_token_id: int,
    sep_token_id: int,
    mask_token_id: int,
    pad_token_id: int,
    feat_stats: tuple[list[float], list[float]] | None = None,
) -> Vlp:
    """A freshly initialised VLP (seed torch before calling for reproducible weights)."""
    return Vlp(
        vlp_config(
            params, vocab_size=vocab_size, visual_feat_dim=visual_feat_dim, cls_token_id=cls_token_id,
            sep_token_id=sep_token_id, mask_token_id=mask_token_id, pad_token_id=pad_token_id,
            feat_stats=feat_stats,
        )  # fmt: skip
    )


def save_vlp(model: Vlp, directory: str | Path) -> None:
    """HF layout, atomically: config.json + model.safetensors (the tied decoder stored once)."""
    config = model.config.to_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})


def load_vlp_config(directory: str | Path) -> BertConfig:
    """The config.json of a VLP directory."""
    return BertConfig.from_dict(read_json(Path(directory) / CONFIG_NAME))


def load_vlp(directory: str | Path) -> Vlp:
    """Load a directory written by :func:`save_vlp`; every key and shape is checked."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint

    directory = Path(directory)
    model = Vlp(load_vlp_config(directory))
    state = read_checkpoint(directory)
    if TIED_KEY not in state and TIED_SOURCE in state:
        state[TIED_KEY] = state[TIED_SOURCE]
    load_state_dict_into(model, state, directory)
    return model
