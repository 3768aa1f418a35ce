"""X-VLM (Zeng, Zhang & Li, "Multi-Grained Vision Language Pre-Training", ICML 2022).

A vision transformer on pixels (transformers' ViT, CLIP vision tower or Swin), a BERT text
encoder whose last ``fusion_layers`` layers cross-attend to the visual tokens, and linear
projections of both [CLS] vectors into a shared space. Multi-grained alignment: the same
losses are applied to whole images with their captions and to *regions* with the phrases
that describe them, where a region is represented by the mean of the patch outputs inside
its box (paper §3.1; formats.md §5, §7). Separate named losses:

- ``itc`` / ``itc_region``: image(region)-text contrastive loss with a learned temperature
  (start 0.07); every pair of the *same* image (region) counts as positive, and the
  similarity is taken against the whole global batch (all processes under ``torchrun``);
- ``itm`` / ``itm_region``: matching on the fused [CLS], with one hard negative text per
  image and one hard negative image per text sampled from the ITC similarity (never a
  positive);
- ``mlm``: masked language modelling (25% of the words, whole words) conditioned on the image;
- ``bbox_l1`` / ``bbox_giou``: box regression of a region phrase from the fused [CLS] of the
  full image, L1 + (1 - GIoU) on normalised (cx, cy, w, h).

Parameter names of the text side follow BERT (``bert.embeddings.*``,
``bert.encoder.layer.{i}.attention.self.query`` ..., ``crossattention.*`` in fusion layers), as
X-VLM's, so a local BERT checkpoint initialises the text and fusion layers (layer i of BERT
-> layer i here, as X-VLM does). The model knows no task, dataset or file format.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from vlpipe.config import XvlmModelParams, resolve_stem_levels
from vlpipe.errors import InputError
from vlpipe.eval.boxes import box_regression_losses
from vlpipe.io import atomic_dir, read_json
from vlpipe.models.layers import LAYER_NORM_EPS, MaskedLMHead, init_bert_weights

IGNORE_INDEX = -100
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_KEY = "mlm_head.decoder.weight"  # same tensor as bert.embeddings.word_embeddings.weight
TEMP_RANGE = (0.001, 0.5)  # X-VLM clamps the learned temperature to this range
NEG_SAMPLING_FLOOR = 1e-5  # added to the softmax so every non-positive keeps a chance to be drawn


# --------------------------------------------------------------------------- config


class XvlmConfig(PretrainedConfig):
    """Everything needed to rebuild an :class:`Xvlm` (saved as config.json next to the weights).

    ``vision_config`` is the backbone's own transformers config as a dict (ViT, CLIP vision or
    Swin, per ``vision_type``). A two-image (NLVR2) task model's config also carries
    ``pair_fusion`` (``concat`` when absent): how :class:`XvlmEncoder` lets the sentence read
    the two images.
    """

    model_type = "vlpipe-xvlm"

    def __init__(
        self,
        vocab_size: int = 1000,
        hidden_size: int = 128,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        text_layers: int = 2,
        fusion_layers: int = 2,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_text_length: int = 40,
        max_position_embeddings: int = 64,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        embed_dim: int = 128,
        temp: float = 0.07,
        vision_type: str = "vit",
        vision_config: dict[str, Any] | None = None,
        tasks: dict[str, bool] | None = None,
        box_head: str = "patch",
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.text_layers = text_layers
        self.fusion_layers = fusion_layers
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_text_length = max_text_length
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.embed_dim = embed_dim
        self.temp = temp
        self.vision_type = vision_type
        self.vision_config = dict(vision_config or {})
        self.tasks = dict(tasks or {"itc": True, "itm": True, "mlm": True, "bbox": True, "region": True})
        self.box_head = box_head
        super().__init__(**kwargs)


def vision_config_dict(params: XvlmModelParams) -> dict[str, Any]:
    """The backbone's transformers config (as a dict) from our params, or from ``vision_init``'s
    config.json when the user has local weights (then the file decides the sizes)."""
    from transformers import CLIPVisionConfig, SwinConfig, ViTConfig

    if params.vision_type == "hybrid":
        return hybrid_vision_config(params)
    if params.vision_init is not None:
        return read_vision_config(params.vision_type, params.vision_init)
    if params.vision_type == "swin":
        cfg = SwinConfig(
            image_size=params.image_size, patch_size=params.patch_size, embed_dim=params.vision_hidden_size,
            depths=list(params.swin_depths), num_heads=list(params.swin_heads), window_size=params.swin_window,
        )  # fmt: skip
    else:
        kind = {"vit": ViTConfig, "clip": CLIPVisionConfig}[params.vision_type]
        cfg = kind(
            image_size=params.image_size, patch_size=params.patch_size, hidden_size=params.vision_hidden_size,
            num_hidden_layers=params.vision_layers, num_attention_heads=params.vision_heads,
            intermediate_size=params.vision_intermediate_size,
        )  # fmt: skip
    return cfg.to_dict()


def hybrid_vision_config(params: XvlmModelParams) -> dict[str, Any]:
    """ViT-hybrid (Dosovitskiy et al. 2021, §3.1): a CNN stem, then a ViT on its feature map with
    1x1 patches. The stem is our detector's backbone (:class:`vlpipe.features.detector.Backbone`),
    its channels taken from the detector's config.json when ``vision_init`` names one."""
    from transformers import ViTConfig

    channels = list(params.stem_channels)
    if params.vision_init is not None:
        path = Path(params.vision_init) / CONFIG_NAME
        channels = read_json(path).get("channels")
        if not (isinstance(channels, list) and channels and all(isinstance(c, int) for c in channels)):
            raise InputError(path, f"expected a detector config with a 'channels' list, got {channels!r}")
    try:
        levels = resolve_stem_levels(params.stem_levels, len(channels))
    except ValueError as e:
        raise InputError(Path(params.vision_init or ".") / CONFIG_NAME, str(e)) from e
    stride = 2 ** len(channels)
    cfg = ViTConfig(
        image_size=params.image_size // stride, patch_size=1,
        num_channels=stem_token_channels(channels, levels, params.stem_pool),
        hidden_size=params.vision_hidden_size, num_hidden_layers=params.vision_layers,
        num_attention_heads=params.vision_heads, intermediate_size=params.vision_intermediate_size,
    )  # fmt: skip
    return cfg.to_dict() | {"stem_channels": channels, "stem_levels": levels, "stem_pool": params.stem_pool}


def stem_token_channels(channels: Sequence[int], levels: Sequence[int], pool: str) -> int:
    """Channels per grid cell from the stem stages ``levels``. Stage i (stride 2^(i+1)) meets the
    last stage's grid (stride 2^len) by space-to-depth (``fold``: C_i * (2^len / 2^(i+1))^2
    channels) or by averaging each cell (``mean``: C_i channels)."""
    if pool == "mean":
        return sum(channels[i] for i in levels)
    return sum(channels[i] * 4 ** (len(channels) - 1 - i) for i in levels)


def read_vision_config(vision_type: str, path: str | Path) -> dict[str, Any]:
    """The backbone config of a local HF directory (a full CLIP dir gives its vision part)."""
    from transformers import CLIPVisionConfig, SwinConfig, ViTConfig

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise InputError(path, f"no {CONFIG_NAME} here: vision_init must be a local transformers directory")
    kind = {"vit": ViTConfig, "clip": CLIPVisionConfig, "swin": SwinConfig}[vision_type]
    try:
        return kind.from_pretrained(str(path), local_files_only=True).to_dict()
    except (OSError, ValueError, TypeError) as e:
        raise InputError(path, f"not a {vision_type} config: {e}") from e


def xvlm_config(params: XvlmModelParams, *, vocab_size: int) -> XvlmConfig:
    """Our params + the tokenizer's vocabulary size -> :class:`XvlmConfig`."""
    tasks = {"itc": params.task_itc, "itm": params.task_itm, "mlm": params.task_mlm,
             "bbox": params.task_bbox, "region": params.task_region}  # fmt: skip
    return XvlmConfig(
        vocab_size=vocab_size, hidden_size=params.hidden_size, num_attention_heads=params.num_attention_heads,
        intermediate_size=params.intermediate_size, text_layers=params.text_layers,
        fusion_layers=params.fusion_layers, hidden_dropout_prob=params.hidden_dropout_prob,
        attention_probs_dropout_prob=params.attention_probs_dropout_prob, max_text_length=params.max_text_length,
        max_position_embeddings=params.max_position_embeddings, type_vocab_size=params.type_vocab_size,
        initializer_range=params.initializer_range, embed_dim=params.embed_dim, temp=params.temp,
        vision_type=params.vision_type, vision_config=vision_config_dict(params), tasks=tasks,
        box_head=params.box_head,
    )  # fmt: skip


# --------------------------------------------------------------------------- vision


def _backbone_class(vision_type: str) -> tuple[type, type]:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SwinConfig, SwinModel, ViTConfig, ViTModel

    classes = {"vit": (ViTModel, ViTConfig), "hybrid": (ViTModel, ViTConfig), "clip": (CLIPVisionModel, CLIPVisionConfig),
               "swin": (SwinModel, SwinConfig)}  # fmt: skip
    if vision_type not in classes:
        raise ValueError(f"unknown vision_type {vision_type!r}; choose one of {sorted(classes)}")
    return classes[vision_type]


class VisionEncoder(nn.Module):
    """Pixels -> visual tokens ``(B, 1 + N, Dv)``: a global token, then the N = grid x grid
    patch tokens in row-major order.

    ViT and CLIP give their [CLS] output as the global token (CLIP's post-LayerNorm is applied
    to every token); Swin has no [CLS], so its global token is the mean of the last stage's
    patches, as X-VLM does. ``hybrid`` runs a ViT on the feature map of a CNN ``stem`` (one
    token per cell).
    """

    def __init__(self, vision_type: str, vision_config: Mapping[str, Any]):
        super().__init__()
        model_cls, config_cls = _backbone_class(vision_type)
        self.vision_type = vision_type
        config = dict(vision_config)
        stem_channels = config.pop("stem_channels", None)
        # Configs written before stem_levels existed read the last stage only.
        self.stem_levels = list(config.pop("stem_levels", [len(stem_channels or [0]) - 1]))
        self.stem_pool = config.pop("stem_pool", "mean")
        cfg = config_cls.from_dict(config)
        kwargs = {} if vision_type == "clip" else {"add_pooling_layer": False}
        self.backbone = model_cls(cfg, **kwargs)
        stride = 1
        if vision_type == "hybrid":
            from vlpipe.features.detector import Backbone

            if not stem_channels:
                raise ValueError("a hybrid vision config needs 'stem_channels'")
            self.stem = Backbone(stem_channels)
            stride = 2 ** len(stem_channels)
        if vision_type == "swin":
            self.width = int(cfg.embed_dim * 2 ** (len(cfg.depths) - 1))
            self.grid = cfg.image_size // (cfg.patch_size * 2 ** (len(cfg.depths) - 1))
        else:
            self.width = int(cfg.hidden_size)
            self.grid = cfg.image_size // cfg.patch_size
        self.image_size = int(cfg.image_size) * stride  # pixels per side of the input

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, 3, S, S) -> (B, 1 + G*G, Dv)
        if self.vision_type == "hybrid":
            maps = self.stem(pixel_values)  # stage i: (B, C_i, S / 2^(i+1), S / 2^(i+1))
            last = len(maps) - 1
            # Bring each chosen stage onto the G x G grid of the last one, f = 2^(last - i): fold gives
            # (B, C_i * f^2, G, G), so the ViT's 1x1 patch embedding sees every pixel-level cell of its
            # patch; mean gives (B, C_i, G, G), the cell's average (its colour without drowning the shape).
            reduce = F.pixel_unshuffle if self.stem_pool == "fold" else F.avg_pool2d
            pixel_values = torch.cat(
                [reduce(maps[i], 2 ** (last - i)) if i < last else maps[i] for i in self.stem_levels], dim=1
            )  # (B, channels, G, G), one token per cell
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state
        if self.vision_type == "clip":
            return self.backbone.post_layernorm(hidden)
        if self.vision_type == "swin":
            return torch.cat([hidden.mean(dim=1, keepdim=True), hidden], dim=1)
        return hidden


def load_vision_weights(vision: VisionEncoder, path: str | Path) -> None:
    """Load a local transformers checkpoint (ViT / CLIP / Swin directory) into the backbone, or
    for ``hybrid`` our detector's backbone (``models/detector``) into the CNN stem.

    Never downloads: ``local_files_only``. Every backbone (stem) parameter must be in the file.
    """
    if vision.vision_type == "hybrid":
        load_stem_weights(vision, path)
        return
    model_cls, _ = _backbone_class(vision.vision_type)
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "vision_init must be a local transformers directory (config.json + weights)")
    kwargs = {} if vision.vision_type == "clip" else {"add_pooling_layer": False}
    try:
        loaded = model_cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot load {vision.vision_type} weights: {e}") from e
    result = vision.backbone.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys:
        raise InputError(path, f"checkpoint lacks backbone weights, e.g. {result.missing_keys[:5]}")


def load_stem_weights(vision: VisionEncoder, path: str | Path) -> None:
    """Copy the detector's ``backbone.*`` weights (``<path>/model.safetensors``) into the stem."""
    from vlpipe.models.convert import read_checkpoint

    state = read_checkpoint(Path(path) / WEIGHTS_NAME)
    stem = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    expected = vision.stem.state_dict()
    if set(stem) != set(expected) or any(stem[k].shape != expected[k].shape for k in expected):
        raise InputError(path, f"detector backbone does not fit the stem (channels {vision.stem.channels})")
    vision.stem.load_state_dict(stem)


# ----------------------------------------------------------------------------- text


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: XvlmConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # (B, L) -> (B, L, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        emb = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(emb))


class SelfOrCrossAttention(nn.Module):
    """Multi-head attention with BERT's names (``query``, ``key``, ``value``); keys and values
    come from ``kv_width``-wide states (the text itself, or the visual tokens)."""

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, hidden // heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, H) -> (B, heads, T, H / heads)
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        # hidden (B, L, H) attends to context (U, T, Dc) where context_mask (U, T) is True; row b
        # uses context rows[b] (None: U = B, row b uses b). Keys and values are projected once per
        # context and then picked per row: ITM scores each image with 3 texts, and all fusion
        # passes of a batch share its images.
        k, v = self._split(self.key(context)), self._split(self.value(context))  # (U, heads, T, d)
        if rows is not None:
            k, v, context_mask = k[rows], v[rows], context_mask[rows]
        q = self._split(self.query(hidden))
        mask = context_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(hidden.shape)  # (B, L, H)


class AttentionOutput(nn.Module):
    """BERT's residual block after attention or FFN: dense, dropout, add, LayerNorm."""

    def __init__(self, in_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class AttentionBlock(nn.Module):
    """``attention.self`` + ``attention.output`` (BERT naming)."""

    def __init__(self, config: XvlmConfig, kv_width: int):
        super().__init__()
        h = config.hidden_size
        self.self = SelfOrCrossAttention(h, config.num_attention_heads, kv_width, config.attention_probs_dropout_prob)
        self.output = AttentionOutput(h, h, config.hidden_dropout_prob)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.output(self.self(hidden, context, context_mask, rows), hidden)


class TwinCrossAttention(nn.Module):
    """ALBEF / X-VLM's NLVR2 cross-attention (Li et al. 2021, "Align before Fuse", §4.3): two
    copies of a fusion layer's cross-attention read the two images *separately* (``self0`` the
    first half of the context's tokens, ``self1`` the second), each with its own output
    projection (``output.dense0`` / ``dense1``), and ``output.merge_layer`` mixes the two reads
    from their concatenation; then dropout, residual and LayerNorm as in BERT. (ALBEF's names;
    its fusion layers all merge.)

    With one softmax over both images' tokens, attention to an object in either image blends
    into one read; here every text token keeps a read of each image, so the layers above can
    combine the two truths ("exactly one image", "A or B", "more ... than"). Built from a
    trained :class:`AttentionBlock`: both branches start as copies of it (as ALBEF loads its
    pre-trained cross-attention into both) and ``merge_layer`` as the mean of the two reads
    (ALBEF draws it at random)."""

    def __init__(self, block: AttentionBlock):
        super().__init__()
        self.self0, self.self1 = copy.deepcopy(block.self), copy.deepcopy(block.self)
        hidden = block.output.dense.out_features
        self.output = nn.Module()
        self.output.dense0 = copy.deepcopy(block.output.dense)
        self.output.dense1 = copy.deepcopy(block.output.dense)
        self.output.merge_layer = nn.Linear(2 * hidden, hidden)
        self.output.LayerNorm = copy.deepcopy(block.output.LayerNorm)
        self.output.dropout = copy.deepcopy(block.output.dropout)
        with torch.no_grad():
            half = torch.eye(hidden) / 2
            self.output.merge_layer.weight.copy_(torch.cat([half, half], dim=1))  # (H, 2H): the mean
            self.output.merge_layer.bias.zero_()

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        # hidden (B, L, H); context (U, 2T, Dv) = [image 0 ; image 1] tokens, context_mask (U, 2T)
        t = context.shape[1] // 2
        out = self.output
        read0 = out.dense0(self.self0(hidden, context[:, :t], context_mask[:, :t], rows))  # (B, L, H)
        read1 = out.dense1(self.self1(hidden, context[:, t:], context_mask[:, t:], rows))  # (B, L, H)
        mixed = out.merge_layer(torch.cat([read0, read1], dim=-1))  # (B, L, 2H) -> (B, L, H)
        return out.LayerNorm(out.dropout(mixed) + hidden)


class XvlmLayer(nn.Module):
    """A post-LayerNorm BERT layer; fusion layers add ``crossattention`` to the visual tokens
    between self-attention and the feed-forward block (X-VLM / ALBEF)."""

    def __init__(self, config: XvlmConfig, vision_width: int | None):
        super().__init__()
        self.attention = AttentionBlock(config, config.hidden_size)
        if vision_width is not None:
            self.crossattention = AttentionBlock(config, vision_width)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = AttentionOutput(config.intermediate_size, config.hidden_size, config.hidden_dropout_prob)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        visual: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        visual_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # hidden (B, L, H), mask (B, L); visual (U, T, Dv), visual_mask (U, T), visual_rows (B,) into U
        hidden = self.attention(hidden, hidden, mask)
        if visual is not None:
            hidden = self.crossattention(hidden, visual, visual_mask, visual_rows)
        return self.output(F.gelu(self.intermediate(hidden)), hidden)


class TextEncoder(nn.Module):
    """BERT embeddings + ``text_layers`` text-only layers + ``fusion_layers`` cross-attention
    layers, all in ``encoder.layer`` (fusion layers last)."""

    def __init__(self, config: XvlmConfig, vision_width: int):
        super().__init__()
        self.num_text_layers = config.text_layers
        self.embeddings = TextEmbeddings(config)
        layers = [XvlmLayer(config, None) for _ in range(config.text_layers)]
        layers += [XvlmLayer(config, vision_width) for _ in range(config.fusion_layers)]
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(layers)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text-only layers: (B, L) -> (B, L, H)."""
        hidden = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer[: self.num_text_layers]:
            hidden = layer(hidden, attention_mask)
        return hidden

    def fuse(
        self,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
        visual_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion layers: text states (B, L, H) cross-attend to visual tokens -> (B, L, H).

        ``visual`` (U, T, Dv) with ``visual_mask`` (U, T); text row b sees ``visual[visual_rows[b]]``
        (``visual_rows`` None: U = B, row-aligned)."""
        for layer in self.encoder.layer[self.num_text_layers :]:
            text = layer(text, attention_mask, visual, visual_mask, visual_rows)
        return text


# ---------------------------------------------------------------------------- heads


class Mlp(nn.Module):
    """X-VLM's two-layer head: Linear(H, 2H), LayerNorm, GeLU, Linear(2H, out)."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden, eps=LAYER_NORM_EPS), nn.GELU(),
            nn.Linear(2 * hidden, out_dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BoxHead(nn.Module):
    """X-VLM's grounding head: fused [CLS] (B, H) -> box (B, 4), sigmoid (cx, cy, w, h)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = Mlp(hidden, 4)

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.mlp(pooled))


class PatchBoxHead(nn.Module):
    """Grounding head that reads the box off the patch grid: the fused [CLS] (B, H) scores
    every patch (B, N, Dv); the box centre is the score-weighted mean of the patch centres
    plus a learned offset of at most half a patch, and its size comes from the [CLS] and the
    weighted patch feature. Same targets and losses as :class:`BoxHead`; the position prior
    lets a model trained from scratch localise after a few thousand examples, where the
    [CLS]-only head of the paper (which relies on pre-trained encoders) stays at the mean box.
    """

    def __init__(self, hidden: int, vision_width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(vision_width, hidden)
        self.mlp = Mlp(hidden + vision_width, 4)
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid  # (G,)
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("centres", torch.stack([xx, yy], -1).reshape(-1, 2), persistent=False)  # (N, 2)

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        if patches is None:
            raise ValueError("PatchBoxHead needs the patch tokens")
        # pooled (B, H), patches (B, N, Dv) -> (B, 4)
        scores = torch.einsum("bh,bnh->bn", self.query(pooled), self.key(patches)) / math.sqrt(pooled.shape[-1])
        weights = scores.softmax(dim=-1)  # (B, N)
        centre = weights @ self.centres  # (B, 2)
        out = self.mlp(torch.cat([pooled, torch.einsum("bn,bnd->bd", weights, patches)], dim=-1))  # (B, 4)
        centre = (centre + torch.tanh(out[:, :2]) / (2 * self.grid)).clamp(0.0, 1.0)
        return torch.cat([centre, torch.sigmoid(out[:, 2:])], dim=-1)


def build_box_head(config: XvlmConfig, vision_width: int, grid: int) -> nn.Module:
    """``config.box_head``: ``patch`` (:class:`PatchBoxHead`) or ``cls`` (:class:`BoxHead`, X-VLM's)."""
    if config.box_head == "cls":
        return BoxHead(config.hidden_size)
    return PatchBoxHead(config.hidden_size, vision_width, grid)


# ------------------------------------------------------------------- region pooling


def patches_in_boxes(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Which patches of a ``grid`` x ``grid`` image lie in each box: ``(B, 4)`` normalised
    (cx, cy, w, h) -> ``(B, grid * grid)`` bool, row-major.

    A patch is inside when its centre is; a box too small to contain any patch centre gets
    the patch under its own centre, so a region is never empty.
    """
    centres = (torch.arange(grid, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid  # (G,)
    cx, cy, w, h = boxes.unbind(-1)  # (B,) each
    in_x = (centres[None, :] >= (cx - w / 2)[:, None]) & (centres[None, :] <= (cx + w / 2)[:, None])  # (B, G)
    in_y = (centres[None, :] >= (cy - h / 2)[:, None]) & (centres[None, :] <= (cy + h / 2)[:, None])  # (B, G)
    inside = (in_y[:, :, None] & in_x[:, None, :]).reshape(len(boxes), grid * grid)  # (B, G*G) row = y
    col = (cx * grid).long().clamp(0, grid - 1)
    row = (cy * grid).long().clamp(0, grid - 1)
    fallback = F.one_hot(row * grid + col, grid * grid).bool()  # (B, G*G)
    return torch.where(inside.any(-1, keepdim=True), inside, fallback)


def region_tokens(image_tokens: torch.Tensor, boxes: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual tokens of regions (X-VLM §3.1): the global slot holds the mean of the patch
    outputs inside the box, and only those patches stay visible to cross-attention.

    ``image_tokens`` (B, 1 + N, Dv), ``boxes`` (B, 4) -> tokens (B, 1 + N, Dv), mask (B, 1 + N).
    """
    inside = patches_in_boxes(boxes, grid)  # (B, N)
    weights = inside.to(image_tokens.dtype)
    patches = image_tokens[:, 1:]  # (B, N, Dv)
    pooled = (weights[:, :, None] * patches).sum(1) / weights.sum(1, keepdim=True)  # (B, Dv)
    tokens = torch.cat([pooled[:, None], patches], dim=1)  # (B, 1 + N, Dv)
    mask = torch.cat([torch.ones_like(inside[:, :1]), inside], dim=1)  # (B, 1 + N)
    return tokens, mask


# --------------------------------------------------------------------------- losses


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every process's gradient of the gathered
    tensor and keeps this process's rows. Each process's ITC loss reads all rows, so the true
    gradient of a row is the sum over processes (the reference's AllGather drops the other
    processes' terms). Plain synchronous ``all_gather``/``all_reduce`` only: the autograd
    collectives of ``torch.distributed.nn`` are deprecated and their gloo all-to-all left
    worker threads that could abort a rank at exit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts, dim=0)  # (world * B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # (world * B, ...): sum of every process's gradient
        start, stop = ctx.rows
        return grad[start:stop]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) of every process along dim 0 (equal B on every process),
    differentiable with respect to this process's rows; ``x`` itself when no process group is
    initialised (one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Concatenate integer ids (B,) of every process (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ids.contiguous())
    return torch.cat(out, dim=0)


def itc_targets(ids: torch.Tensor, all_ids: torch.Tensor) -> torch.Tensor:
    """Soft ITC targets (B, G): uniform over every column with the same image (region) id."""
    positive = (ids[:, None] == all_ids[None, :]).float()  # (B, G)
    return positive / positive.sum(1, keepdim=True)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, ids: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of L2-normalised (B, E) image and text features.

    Local rows are compared with the columns of the *global* batch (all processes); a row's
    target is uniform over the columns sharing its id (several captions of one image are all
    positives). The per-process loss is the mean over its rows, so averaging it over processes
    (what DDP does to gradients) gives the one-process loss of the global batch.
    """
    image_all = gather_with_grad(image_feat)  # (G, E)
    text_all = gather_with_grad(text_feat)  # (G, E)
    targets = itc_targets(ids, gather_ids(ids))  # (B, G)
    sim_i2t = image_feat @ text_all.t() / temp  # (B, G)
    sim_t2i = text_feat @ image_all.t() / temp  # (B, G)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(
    sim: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative column per row of a local (B, B) similarity, drawn in proportion to
    softmax(sim) over the columns whose id differs from the row's (never a positive).

    Returns (negative index (B,), valid (B,)): a row whose every column shares its id has no
    negative; it gets index 0 and ``valid`` False, and the caller leaves it out of the loss.
    """
    same = ids[:, None] == ids[None, :]  # (B, B)
    weights = (F.softmax(sim.float(), dim=1) + NEG_SAMPLING_FLOOR).masked_fill(same, 0.0)
    valid = (~same).any(dim=1)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))  # any row for multinomial
    negatives = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(valid, negatives, torch.zeros_like(negatives)), valid


def whole_word_mask(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    continuation: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking by whole words (X-VLM: 25%): a word (its first piece and every following
    ``##`` piece, marked by ``continuation`` (V,) bool over the vocabulary) is chosen with
    ``prob``; each token of a chosen word becomes [MASK] (``mask_frac``), a random token
    (``random_frac``) or stays. ``maskable`` (B, L) excludes specials and padding; pass an
    all-False ``continuation`` for token-level masking. Returns (masked ids, labels -100 elsewhere).
    """
    # input_ids, maskable (B, L)
    maskable = maskable.bool()
    starts = maskable & ~continuation[input_ids]  # (B, L) first piece of each word
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    start_of = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), dim=1).values  # (B, L)
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = maskable & (starts & (u < prob)).gather(1, start_of)  # (B, L) every piece of chosen words
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    how = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    masked = torch.where(chosen & (how < mask_frac), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (how >= mask_frac) & (how < mask_frac + random_frac), random_ids, masked)
    return masked, labels


class WholeWordMasker:
    """Adds ``mlm_input_ids`` / ``mlm_labels`` to a batch with :func:`whole_word_mask`
    (X-VLM: 25% of the words). ``vocab`` lists the token of every id (``##`` marks a word's
    continuation pieces); ``special_ids`` are never masked."""

    def __init__(self, vocab: Sequence[str], special_ids: Sequence[int], mask_token_id: int, params: XvlmModelParams):
        whole = params.whole_word_mask
        self.continuation = torch.tensor([whole and t.startswith("##") for t in vocab], dtype=torch.bool)  # (V,)
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.kwargs = {"mask_token_id": mask_token_id, "vocab_size": len(vocab), "prob": params.mlm_prob,
                       "mask_frac": params.mlm_mask_frac, "random_frac": params.mlm_random_frac}  # fmt: skip

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, params: XvlmModelParams) -> WholeWordMasker:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return cls(vocab, tokenizer.all_special_ids, tokenizer.mask_token_id, params)

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]  # (B, L)
        maskable = batch["attention_mask"].bool() & ~torch.isin(ids, self.special.to(ids.device))
        masked, labels = whole_word_mask(ids, maskable, self.continuation.to(ids.device), generator=generator,
                                         **self.kwargs)  # fmt: skip
        return batch | {"mlm_input_ids": masked, "mlm_labels": labels}


def _weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # (R, C), (R,), (R,) -> mean of the weighted rows; multiplying keeps every row in the graph
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_row * weight).sum() / weight.sum().clamp(min=1)


# ---------------------------------------------------------------------------- model


@dataclass
class VisualBatch:
    """Visual side of one granularity: tokens (B, T, Dv), their mask (B, T), ITC features (B, E)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    feat: torch.Tensor


@dataclass
class TextBatch:
    """Text side: ids / mask (B, L), text-encoder states (B, L, H), ITC features (B, E)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    hidden: torch.Tensor
    feat: torch.Tensor


@dataclass
class XvlmOutput:
    """Named losses (``loss`` their sum) and the box prediction of the region phrases."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    boxes: torch.Tensor | None = None  # (B, 4) normalised (cx, cy, w, h)


class Xvlm(nn.Module):
    """X-VLM with every pre-training head: ``vision``, ``bert`` (text + fusion layers),
    ``vision_proj`` / ``text_proj`` (ITC), ``temp``, ``itm_head``, ``mlm_head`` (tied to the
    word embeddings), ``bbox_head``."""

    def __init__(self, config: XvlmConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision_type, config.vision_config)
        self.bert = TextEncoder(config, self.vision.width)
        self.vision_proj = nn.Linear(self.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        self.itm_head = Mlp(config.hidden_size, 2)
        init = partial(init_bert_weights, std=config.initializer_range)
        for module in (self.bert, self.vision_proj, self.text_proj, self.itm_head):
            module.apply(init)
        # Heads of disabled tasks are not built, so every parameter takes part in each step
        # (DDP needs that) and e.g. retrieval fine-tuning carries no MLM or box head.
        if self.tasks.get("mlm", True):
            self.mlm_head = MaskedLMHead(self.bert.embeddings.word_embeddings)
            self.mlm_head.transform.apply(init)
        if self.tasks.get("bbox", True):
            self.bbox_head = build_box_head(config, self.vision.width, self.vision.grid)
            self.bbox_head.apply(init)

    def tie_weights(self) -> None:
        """Re-tie the MLM decoder to the word embeddings (after loading a state dict)."""
        if hasattr(self, "mlm_head"):
            self.mlm_head.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @property
    def tasks(self) -> dict[str, bool]:
        return self.config.tasks

    # ---- the two towers and the fusion
    def clamped_temp(self) -> torch.Tensor:
        return self.temp.clamp(*TEMP_RANGE)

    def embed_image(self, pixel_values: torch.Tensor) -> VisualBatch:
        """(B, 3, S, S) -> whole-image tokens, all-ones mask and normalised ITC features."""
        tokens = self.vision(pixel_values)  # (B, 1 + N, Dv)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return VisualBatch(tokens, mask, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1))

    def embed_regions(self, image: VisualBatch, boxes: torch.Tensor) -> VisualBatch:
        """Regions (B, 4) of the images in ``image`` -> region tokens, mask, ITC features."""
        tokens, mask = region_tokens(image.tokens, boxes, self.vision.grid)
        return VisualBatch(tokens, mask, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1))

    def embed_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> TextBatch:
        hidden = self.bert.encode_text(input_ids, attention_mask, token_type_ids)  # (B, L, H)
        return TextBatch(input_ids, attention_mask, hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1))

    def fused_cls(self, visual: VisualBatch, text: TextBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Fused [CLS] (B, H) of texts with their visual entries (``rows`` (B,) into ``visual``;
        None: row-aligned)."""
        return self.bert.fuse(text.hidden, text.attention_mask, visual.tokens, visual.mask, rows)[:, 0]

    def match_logits(self, visual: VisualBatch, text: TextBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits (B, 2) of texts with their visual entries; class 1 = the text matches."""
        return self.itm_head(self.fused_cls(visual, text, rows))

    # ---- losses
    def itm_loss(
        self, visual: VisualBatch, text: TextBatch, ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Matching on B positives, B (image, hard negative text) and B (hard negative image,
        text) pairs, negatives sampled from the local ITC similarity (X-VLM)."""
        with torch.no_grad():
            sim_i2t = visual.feat @ text.feat.t() / self.clamped_temp()  # (B, B)
            neg_text, ok_text = sample_hard_negatives(sim_i2t, ids, generator)
            neg_image, ok_image = sample_hard_negatives(sim_i2t.t(), ids, generator)
        b = len(ids)
        rows = torch.cat([torch.arange(b, device=ids.device), torch.arange(b, device=ids.device), neg_image])  # (3B,)
        pairs_text = TextBatch(
            torch.cat([text.input_ids, text.input_ids[neg_text], text.input_ids]),
            torch.cat([text.attention_mask, text.attention_mask[neg_text], text.attention_mask]),
            torch.cat([text.hidden, text.hidden[neg_text], text.hidden]),
            text.feat,
        )
        logits = self.match_logits(visual, pairs_text, rows)  # (3B, 2)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        weight = torch.cat([torch.ones(b, device=ok_text.device), ok_text.float(), ok_image.float()])
        return _weighted_ce(logits, labels, weight)

    def mlm_loss(self, visual: VisualBatch, masked_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Masked LM on the fused states; logits only at masked positions (cheap with big vocabularies)."""
        text = self.bert.encode_text(masked_ids, attention_mask)
        fused = self.bert.fuse(text, attention_mask, visual.tokens, visual.mask)  # (B, L, H)
        picked = labels != IGNORE_INDEX  # (B, L)
        logits = self.mlm_head(fused[picked])  # (M, V)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels[picked])

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        *,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_input_ids: torch.Tensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        region_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> XvlmOutput:
        """Pre-training / retrieval losses of a batch of B images with one caption each and,
        optionally, one region phrase each.

        pixel_values (B, 3, S, S); input_ids / attention_mask (B, L) captions; image_ids (B,)
        int64 (equal ids = same image, positives for ITC); mlm_input_ids / mlm_labels (B, L)
        from :func:`whole_word_mask`; region_boxes (B, 4) normalised (cx, cy, w, h) with the
        phrases region_input_ids / region_attention_mask (B, Lr) and region_ids (B,) (equal =
        same region). Losses of disabled tasks (config.tasks) or missing inputs are skipped.
        """
        out = XvlmOutput()
        image = self.embed_image(pixel_values)
        text = self.embed_text(input_ids, attention_mask)
        losses = out.losses
        if self.tasks.get("itc", True):
            losses["itc"] = itc_loss(image.feat, text.feat, image_ids, self.clamped_temp())
        if self.tasks.get("itm", True):
            losses["itm"] = self.itm_loss(image, text, image_ids, generator)
        if self.tasks.get("mlm", True) and mlm_input_ids is not None and mlm_labels is not None:
            losses["mlm"] = self.mlm_loss(image, mlm_input_ids, attention_mask, mlm_labels)
        if region_boxes is not None and region_input_ids is not None and region_attention_mask is not None:
            phrase = self.embed_text(region_input_ids, region_attention_mask)
            if self.tasks.get("region", True) and region_ids is not None:
                region = self.embed_regions(image, region_boxes)
                if self.tasks.get("itc", True):
                    losses["itc_region"] = itc_loss(region.feat, phrase.feat, region_ids, self.clamped_temp())
                if self.tasks.get("itm", True):
                    losses["itm_region"] = self.itm_loss(region, phrase, region_ids, generator)
            if self.tasks.get("bbox", True):
                out.boxes = self.bbox_head(self.fused_cls(image, phrase), image.tokens[:, 1:])  # (B, 4)
                losses.update(box_regression_losses(out.boxes, region_boxes))
        if losses:
            losses["loss"] = torch.stack(list(losses.values())).sum()
        return out


# -------------------------------------------------------------------- task encoder


class FrozenFeatureCache:
    """The outputs of a frozen module, kept per input row so that each distinct input is
    encoded once: ``cache(x) == module(x)`` for (B, ...) ``x``, rows looked up by their bytes.

    Why: with ``freeze_vision`` the image encoder is a fixed feature extractor (its ViT has no
    dropout, its stem's GroupNorm no running statistics), yet it is 40-45% of a VQA / NLVR2
    fine-tuning step and sees the same images every epoch. Only for modules whose output
    depends on the row alone, with no gradient to pass (callers check ``requires_grad``).
    Stops adding entries at ``max_bytes`` (the rest is computed every time), so a real-scale
    image set cannot fill the memory.
    """

    def __init__(self, module: nn.Module, max_bytes: int):
        self.module = module
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import hashlib

        rows = x.detach().cpu().contiguous()  # (B, ...)
        keys = [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in rows]
        todo: dict[bytes, int] = {}  # key -> first row with it, for the rows to encode
        for i, k in enumerate(keys):
            if k not in self._store and k not in todo:
                todo[k] = i
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            with torch.no_grad():
                out = self.module(x[list(todo.values())])  # (M, ...)
            for k, o in zip(todo, out, strict=True):
                fresh[k] = o
                size = o.numel() * o.element_size()
                if self.nbytes + size <= self.max_bytes:
                    self._store[k] = o.clone()
                    self.nbytes += size
        return torch.stack([fresh[k] if k in fresh else self._store[k] for k in keys])  # (B, ...)


class XvlmEncoder(nn.Module):
    """X-VLM as a task encoder: ``encoder(**inputs) -> pooled (B, H)``, the fused [CLS].

    Visual input is ``pixel_values`` (B, 3, S, S). With ``num_images`` = 2 (NLVR2) the rows
    come in pairs (an example's sentence with its image 0, then with its image 1) and the
    sentence attends to *both* images in every row, its own image first, so the two pooled
    vectors the task head concatenates are the sentence read against (own, other) image.
    How, is ``model.config.pair_fusion``:

    - ``concat``: one cross-attention over the two images' tokens, each image tagged by a
      learned slot embedding (``image_slot``);
    - ``twin``: ALBEF / X-VLM's NLVR2 fusion, each fusion layer's cross-attention replaced (in
      ``model`` itself) by a :class:`TwinCrossAttention` that reads own and other image
      separately and merges the two reads;
    - ``own``: LXMERT's NLVR2 rows, each row reads only its own image (as a VQA model reads
      one), so only the task head combines the two reads.
    """

    def __init__(self, model: Xvlm, num_images: int = 1):
        super().__init__()
        if num_images not in (1, 2):
            raise ValueError(f"num_images must be 1 or 2, got {num_images}")
        self.vision = model.vision
        self.bert = model.bert
        self.config = model.config
        self.num_images = num_images
        self.vision_cache: FrozenFeatureCache | None = None  # cache_frozen_vision; not a submodule
        self.pair_fusion = str(getattr(model.config, "pair_fusion", "concat")) if num_images == 2 else None
        if self.pair_fusion == "concat":
            self.image_slot = nn.Parameter(torch.zeros(2, model.vision.width))
        elif self.pair_fusion == "twin":
            for layer in self.bert.encoder.layer[self.bert.num_text_layers :]:
                layer.crossattention = TwinCrossAttention(layer.crossattention)
        elif self.pair_fusion not in (None, "own"):
            raise ValueError(f"pair_fusion must be 'concat', 'twin' or 'own', got {self.pair_fusion!r}")

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_text_length(self) -> int:
        return int(self.config.max_text_length)

    def cache_frozen_vision(self, max_bytes: int) -> None:
        """Encode each distinct image once (:class:`FrozenFeatureCache`): for a frozen image
        encoder only, whose outputs no gradient needs."""
        if any(q.requires_grad for q in self.vision.parameters()):
            raise ValueError("only a frozen image encoder's outputs can be cached (freeze_vision)")
        self.vision_cache = FrozenFeatureCache(self.vision, max_bytes)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, 3, S, S) -> (B, 1 + N, Dv)
        return self.vision(pixel_values) if self.vision_cache is None else self.vision_cache(pixel_values)

    def _pair_visual(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (2B, T, Dv) rows (b, k) -> (2B, 2T, Dv): [own image + slot 0 ; other image + slot 1]
        # (twin: no slots; its two branches read the halves separately)
        rows, t, d = tokens.shape
        pairs = tokens.view(rows // 2, 2, t, d)
        own, other = pairs, pairs.flip(1)
        if self.pair_fusion == "concat":
            own, other = own + self.image_slot[0], other + self.image_slot[1]
        visual = torch.cat([own, other], dim=2).view(rows, 2 * t, d)
        return visual, torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        single_image: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused [CLS] (B, H) and the visual tokens the text attended to (B, T, Dv).

        ``single_image``: every row reads its own image only, as a VQA model does, also in a
        two-image encoder (NLVR2 multi-tasked with VQA, :class:`Nlvr2WithVqa`)."""
        # (B, L) text, (B, 3, S, S) pixels
        tokens = self.image_tokens(pixel_values)  # (B, 1 + N, Dv)
        if self.num_images == 2 and not single_image and self.pair_fusion != "own":
            visual, visual_mask = self._pair_visual(tokens)
        else:
            visual = tokens
            visual_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        text = self.bert.encode_text(input_ids, attention_mask, token_type_ids)
        return self.bert.fuse(text, attention_mask, visual, visual_mask)[:, 0], visual

    def fused_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every fused text state (B, L, H), [CLS] first (:meth:`encode` keeps only that one)."""
        tokens = self.image_tokens(pixel_values)  # (B, 1 + N, Dv)
        if self.num_images == 2 and self.pair_fusion != "own":
            visual, visual_mask = self._pair_visual(tokens)
        else:
            visual, visual_mask = tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        text = self.bert.encode_text(input_ids, attention_mask, token_type_ids)
        return self.bert.fuse(text, attention_mask, visual, visual_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        single_image: bool = False,
    ) -> torch.Tensor:
        # (B, L) text, (B, 3, S, S) pixels -> (B, H)
        return self.encode(input_ids, attention_mask, pixel_values, token_type_ids, single_image)[0]


class AnswerFeatureHead(nn.Module):
    """NLVR2 classifier that also reads a VQA head's answers to each row.

    ``answers`` is a VQA answer head (H -> A, copied from the VQA model NLVR2 starts from and
    trained on); the classifier is LXMERT's NLVR2 MLP (:class:`~vlpipe.models.layers.AnswerHead`) over the rows' pooled vectors and their
    answer logits: ``(B, n * H) -> [pooled ; answers(row) for each row] (B, n * (H + A)) -> (B, 2)``.
    Why: the VQA model's per-image answers decide most NLVR2 sentences of the world
    (``vlpipe probe-nlvr2``), but a fresh MLP on the pooled vectors alone has to find them again
    from 6000 pairs (README).

    ``symmetric``: the classifier reads the rows in both orders and its two logits are averaged,
    so the output is a symmetric function of the rows. That is the right prior when each row
    reads the sentence from its own side (``own_frame``): a pair and its mirrored copy (images
    and "left" / "right" swapped, same label) are then the same two rows in the other order, so
    the label cannot depend on the order, and the classifier need not learn that from data.
    No parameter is added: a model trained either way loads and runs either way.
    """

    def __init__(self, answers: nn.Module, hidden_size: int, num_answers: int, num_images: int = 2,
                 symmetric: bool = False):  # fmt: skip
        super().__init__()
        if symmetric and num_images != 2:
            raise ValueError(f"a symmetric AnswerFeatureHead reads two rows, not {num_images}")
        self.hidden_size = hidden_size
        self.answers = answers
        self.symmetric = symmetric
        from vlpipe.models.layers import AnswerHead

        self.classifier = AnswerHead(num_images * (hidden_size + num_answers), 2, hidden_dim=num_images * hidden_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # (B, n * H) -> (B, 2)
        b = pooled.shape[0]
        rows = pooled.reshape(-1, self.hidden_size)  # (B * n, H)
        answers = self.answers(rows)  # (B * n, A)
        x = torch.cat([pooled, answers.reshape(b, -1)], dim=-1)  # (B, n * (H + A))
        if not self.symmetric:
            return self.classifier(x)
        h, a = self.hidden_size, answers.shape[-1]
        # the same input with the two rows in the other order
        swapped = torch.cat([pooled.reshape(b, 2, h).flip(1).reshape(b, 2 * h),
                             answers.reshape(b, 2, a).flip(1).reshape(b, 2 * a)], dim=-1)  # fmt: skip
        return self.classifier(torch.stack([x, swapped])).mean(0)  # (2, B, 2) -> (B, 2)


class TokenPairHead(nn.Module):
    """NLVR2 head that reads the two rows' fused *token* states side by side.

    Both rows of an example hold the same sentence, so token t of row 0 and token t of row 1
    are the same word read against the two images (own image first): the head merges them,
    ``[x0_t ; x1_t]`` (2H) -> H, runs ``layers`` self-attention layers over the merged
    sentence, and classifies its [CLS] together with both rows' own [CLS] (and, with an
    ``answers`` head, both rows' answer logits, as :class:`AnswerFeatureHead`). Why: a
    clause such as "contains no red circles" is decided by what its words found in one image,
    and the rows' [CLS] alone carry that only as far as NLVR2 fine-tuning teaches them to
    (UNITER's NLVR2 pair heads, Chen et al., 2020, read the two rows' outputs jointly too).
    """

    def __init__(self, hidden_size: int, heads: int, layers: int = 1, answers: nn.Module | None = None,
                 num_answers: int = 0, dropout: float = 0.1):  # fmt: skip
        super().__init__()
        from vlpipe.models.layers import AnswerHead

        self.hidden_size = hidden_size
        self.answers = answers
        self.merge = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.LayerNorm(hidden_size, eps=1e-12))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_size, heads, 4 * hidden_size, dropout, activation="gelu", batch_first=True)
            for _ in range(layers)
        )
        extra = 2 * num_answers if answers is not None else 0
        self.classifier = AnswerHead(3 * hidden_size + extra, 2, hidden_dim=2 * hidden_size)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # states (2B, L, H): rows (example, image); attention_mask (2B, L)
        rows, length, h = states.shape
        pairs = states.view(rows // 2, 2, length, h)
        x0, x1 = pairs[:, 0], pairs[:, 1]  # (B, L, H) each
        z = self.merge(torch.cat([x0, x1], dim=-1))  # (B, L, H)
        pad = attention_mask.view(rows // 2, 2, length)[:, 0] == 0  # (B, L), same sentence in both rows
        for layer in self.layers:
            z = layer(z, src_key_padding_mask=pad)
        feats = [z[:, 0], x0[:, 0], x1[:, 0]]  # (B, H) each
        if self.answers is not None:
            feats += [self.answers(x0[:, 0]), self.answers(x1[:, 0])]  # (B, A) each
        return self.classifier(torch.cat(feats, dim=-1))  # (B, 2)


class TokenPairModel(nn.Module):
    """NLVR2 task model with a :class:`TokenPairHead`: ``model(inputs) -> (B, 2)``, called
    like a :class:`vlpipe.tasks.base.TaskModel` (same ``encoder`` / ``head`` / ``num_images``)."""

    num_images = 2

    def __init__(self, encoder: XvlmEncoder, head: TokenPairHead):
        super().__init__()
        if encoder.num_images != 2:
            raise ValueError("the token pair head reads two images per sentence")
        self.encoder = encoder
        self.head = head

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder.fused_states(**inputs), inputs["attention_mask"])


class Nlvr2WithVqa(nn.Module):
    """NLVR2 multi-tasked with VQA (12-in-1, Lu et al., 2020): one encoder, two heads.

    ``nlvr2`` is the NLVR2 task model (its head an :class:`AnswerFeatureHead`); VQA questions
    go through the same encoder, each reading only its own image (``single_image``), and
    through the VQA answer head that the NLVR2 classifier reads. Why: NLVR2 alone wears down
    what the VQA model answered (README, "Where X-VLM's NLVR2 loses"); VQA's questions keep
    those answers, and the features that give them, trained while NLVR2 learns its sentences.
    Only ``nlvr2`` is saved: the VQA head lives inside it.
    """

    def __init__(self, nlvr2: nn.Module):
        super().__init__()
        if not isinstance(getattr(nlvr2, "head", None), AnswerFeatureHead):
            raise ValueError("Nlvr2WithVqa needs an NLVR2 model whose head is an AnswerFeatureHead")
        self.nlvr2 = nlvr2

    def forward(
        self, inputs: dict[str, torch.Tensor], vqa_inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # NLVR2 (2B rows) -> (B, 2); VQA (Q rows) -> (Q, A)
        pooled = self.nlvr2.encoder(**vqa_inputs, single_image=True)  # (Q, H)
        return self.nlvr2(inputs), self.nlvr2.head.answers(pooled)


class XvlmGrounder(nn.Module):
    """Grounding model (RefCOCO): ``model(inputs) -> boxes (B, 4)`` as normalised (cx, cy, w, h),
    from the fused [CLS] of (image, expression) and the image's patch tokens. Called like a
    :class:`vlpipe.tasks.base.TaskModel` (same ``encoder`` / ``num_images`` attributes)."""

    num_images = 1

    def __init__(self, encoder: XvlmEncoder, head: nn.Module):
        super().__init__()
        if encoder.num_images != 1:
            raise ValueError("grounding reads one image per expression")
        self.encoder = encoder
        self.head = head

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled, visual = self.encoder.encode(**inputs)  # (B, H), (B, 1 + N, Dv)
        return self.head(pooled, visual[:, 1:])


# ----------------------------------------------------------------- build / save / load


def build_xvlm(params: XvlmModelParams, *, vocab_size: int) -> Xvlm:
    """A fresh X-VLM; the backbone (``vision_init``) and BERT (``text_init``) weights are
    loaded from local files when given."""
    model = Xvlm(xvlm_config(params, vocab_size=vocab_size))
    if params.vision_init is not None:
        load_vision_weights(model.vision, params.vision_init)
    if params.text_init is not None:
        load_text_weights(model, params.text_init)
    return model


def load_text_weights(model: Xvlm, path: str | Path) -> int:
    """Initialise embeddings and text/fusion layers from a local BERT checkpoint (file or HF
    directory; ``bert.`` prefix optional). Cross-attention stays fresh (BERT has none), as in
    X-VLM. Returns the number of tensors copied; shapes must agree."""
    from vlpipe.models.convert import read_checkpoint

    state = read_checkpoint(path)
    ours = model.bert.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("bert.")
        name = name.replace(".intermediate.dense.", ".intermediate.")  # BERT nests the FFN input Linear
        if name in ours:
            if ours[name].shape != value.shape:
                raise InputError(path, f"{key}: shape {tuple(value.shape)} does not fit {tuple(ours[name].shape)}")
            copied[name] = value
    if not any(k.startswith("encoder.layer.") for k in copied):
        raise InputError(path, "no BERT encoder layers found (expected keys like bert.encoder.layer.0.*)")
    model.bert.load_state_dict(copied, strict=False)
    model.tie_weights()
    return len(copied)


def write_xvlm_files(model: Xvlm, directory: str | Path) -> None:
    """Write config.json + model.safetensors (tied decoder stored once) into ``directory``."""
    directory = Path(directory)
    (directory / CONFIG_NAME).write_text(model.config.to_json_string(), encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_xvlm(model: Xvlm, out_dir: str | Path) -> None:
    """:func:`write_xvlm_files` into ``out_dir``, atomically (a failure leaves nothing)."""
    with atomic_dir(out_dir) as tmp:
        write_xvlm_files(model, tmp)


def load_xvlm_config(model_dir: str | Path) -> XvlmConfig:
    return XvlmConfig.from_dict(read_json(Path(model_dir) / CONFIG_NAME))


def load_xvlm(model_dir: str | Path) -> Xvlm:
    """Rebuild an :class:`Xvlm` saved by :func:`save_xvlm`; every key and shape is checked."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint

    model_dir = Path(model_dir)
    model = Xvlm(load_xvlm_config(model_dir))
    state = dict(read_checkpoint(model_dir / WEIGHTS_NAME))
    if hasattr(model, "mlm_head"):
        state[TIED_KEY] = state.get("bert.embeddings.word_embeddings.weight", torch.empty(0))
    load_state_dict_into(model, state, model_dir)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

