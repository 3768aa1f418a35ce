"""LXMERT (Tan & Bansal, EMNLP 2019): encoder, pre-training heads, losses and masking.

The encoder is transformers' ``LxmertModel`` (language / relational / cross-modality
layers, whose submodule names are the reference's); the heads are ours but carry the
names of the reference and of transformers' ``LxmertForPreTraining`` (``lxmert.*``,
``cls.*``, ``obj_predict_head.*``, ``answer_head.*``), so ``model_LXRT.pth``, fine-tuned
``BEST.pth`` files (see :mod:`vlpipe.models.convert`) and a local copy of
``unc-nlp/lxmert-base-uncased`` load without renaming tricks.

Pre-training objectives (paper §3.1, formats.md §7), each returned as a separate loss:
masked LM, image-sentence matching, masked object classification and attribute
classification (cross-entropy weighted by detector confidence), masked feature regression
(SmoothL1) and question answering (only on matched pairs); the three visual losses are
multiplied by ``visual_loss_weight`` (6.67 ~ 1/0.15, because they are averaged over all
boxes while only the masked 15% carry loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import LxmertConfig, LxmertModel

from vlpipe.config import LxmertModelParams
from vlpipe.data.visual import RegionInputs
from vlpipe.io import atomic_dir, read_json
from vlpipe.models.layers import AnswerHead, HeadTransform, MaskedLMHead, init_bert_weights

IGNORE_INDEX = -100
TIED_KEY = "cls.predictions.decoder.weight"  # same tensor as lxmert.embeddings.word_embeddings.weight
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VISUAL_TASKS = ("obj", "attr", "feat")


# --------------------------------------------------------------------------- config


def lxmert_config(
    params: LxmertModelParams,
    *,
    vocab_size: int,
    visual_feat_dim: int,
    visual_pos_dim: int,
    num_object_labels: int,
    num_attr_labels: int,
    num_answers: int,
    feat_stats: tuple[list[float], list[float]] | None = None,
) -> LxmertConfig:
    """Build the transformers ``LxmertConfig`` from our params and the upstream size facts.

    vocab_size comes from the tokenizer, visual_feat_dim / visual_pos_dim from the feature
    store's meta.json, object / attribute label counts from the detector's meta.json and
    num_answers from the pre-training answer table. ``qa_loss``, ``max_text_length``,
    ``max_boxes`` and the input statistics ``visual_feat_mean`` / ``visual_feat_std`` (D,)
    (``feat_stats``, when ``standardize_features``) travel as extra keys (transformers ignores
    them), so every later user of the checkpoint feeds it what it was trained on.
    """
    if params.standardize_features and feat_stats is None:
        raise ValueError("standardize_features needs feat_stats (mean, std) of the pre-training features")
    mean, std = feat_stats if params.standardize_features and feat_stats is not None else (None, None)
    return LxmertConfig(
        vocab_size=vocab_size,
        hidden_size=params.hidden_size,
        num_attention_heads=params.num_attention_heads,
        intermediate_size=params.intermediate_size,
        l_layers=params.l_layers,
        x_layers=params.x_layers,
        r_layers=params.r_layers,
        hidden_dropout_prob=params.hidden_dropout_prob,
        attention_probs_dropout_prob=params.attention_probs_dropout_prob,
        max_position_embeddings=params.max_position_embeddings,
        type_vocab_size=params.type_vocab_size,
        initializer_range=params.initializer_range,
        visual_feat_dim=visual_feat_dim,
        visual_pos_dim=visual_pos_dim,
        num_object_labels=num_object_labels,
        num_attr_labels=num_attr_labels,
        num_qa_labels=num_answers,
        visual_loss_normalizer=params.visual_loss_weight,
        task_mask_lm=params.task_mlm,
        task_matched=params.task_matched,
        task_obj_predict=params.task_obj or params.task_attr or params.task_feat,
        task_qa=params.task_qa,
        visual_obj_loss=params.task_obj,
        visual_attr_loss=params.task_attr,
        visual_feat_loss=params.task_feat,
        qa_loss=params.qa_loss,
        max_text_length=params.max_text_length,
        max_boxes=params.max_boxes,
        visual_feat_mean=mean,
        visual_feat_std=std,
    )


def max_boxes_of(config: LxmertConfig) -> int | None:
    """The ``max_boxes`` a model was trained with (None: all boxes, e.g. reference checkpoints)."""
    value = getattr(config, "max_boxes", None)
    return None if value is None else int(value)


def region_inputs(config: LxmertConfig, store_dir: str | Path) -> RegionInputs:
    """The region source a model was trained with: its ``max_boxes`` and input statistics."""
    return RegionInputs(
        store_dir,
        max_boxes_of(config),
        getattr(config, "visual_feat_mean", None),
        getattr(config, "visual_feat_std", None),
    )


def _enabled_visual_tasks(config: LxmertConfig) -> list[str]:
    if not config.task_obj_predict:
        return []
    flags = {"obj": config.visual_obj_loss, "attr": config.visual_attr_loss, "feat": config.visual_feat_loss}
    return [k for k in VISUAL_TASKS if flags[k]]


# ---------------------------------------------------------------------------- heads


class PreTrainingHeads(nn.Module):
    """``cls``: masked-LM head (tied) and the matching classifier ``seq_relationship`` (H -> 2)."""

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        hidden = word_embeddings.weight.shape[1]
        self.predictions = MaskedLMHead(word_embeddings)
        self.seq_relationship = nn.Linear(hidden, 2)


class ObjectPredictionHead(nn.Module):
    """``obj_predict_head``: shared transform, then ``decoder_dict`` {obj, attr, feat} per box."""

    def __init__(self, hidden: int, out_dims: dict[str, int]):
        super().__init__()
        self.transform = HeadTransform(hidden)
        self.decoder_dict = nn.ModuleDict({k: nn.Linear(hidden, d) for k, d in out_dims.items()})

    def forward(self, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        # (B, N, H) -> {key: (B, N, out_dim)}
        hidden = self.transform(visual)
        return {k: dec(hidden) for k, dec in self.decoder_dict.items()}


# --------------------------------------------------------------------------- output


@dataclass
class LxmertOutput:
    """Everything one forward pass returns.

    Shapes: B batch, L text length, N boxes, H hidden, V vocab, A answers, D feature dim.

    - ``language_output`` (B, L, H), ``vision_output`` (B, N, H), ``pooled_output`` (B, H)
    - ``mlm_logits`` (B, L, V); ``match_logits`` (B, 2), class 1 = the sentence matches
    - ``obj_logits`` (B, N, num_object_labels), ``attr_logits`` (B, N, num_attr_labels),
      ``feat_pred`` (B, N, D); None when the task is off
    - ``qa_logits`` (B, A); None without a QA head
    - ``losses``: named scalar losses of the targets that were given (``mlm``, ``matched``,
      ``obj``, ``attr``, ``feat``, ``qa``; visual ones already x visual_loss_weight) and
      ``loss``, their sum; empty when no target was given.
    """

    language_output: torch.Tensor
    vision_output: torch.Tensor
    pooled_output: torch.Tensor
    mlm_logits: torch.Tensor
    match_logits: torch.Tensor
    obj_logits: torch.Tensor | None = None
    attr_logits: torch.Tensor | None = None
    feat_pred: torch.Tensor | None = None
    qa_logits: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------- model


class Lxmert(nn.Module):
    """LXMERT encoder with every pre-training head; the parameter names are HF's.

    ``lxmert`` (transformers ``LxmertModel``), ``cls`` (MLM + matching), ``obj_predict_head``
    (when a visual task is on), ``answer_head`` (when ``task_qa``; ``answer_head.logit_fc``
    is LXMERT's 768 -> 1536, GeLU, LayerNorm, 1536 -> num_answers).
    """

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config
        self.qa_loss = getattr(config, "qa_loss", "ce")
        if self.qa_loss not in ("ce", "bce"):
            raise ValueError(f"qa_loss must be 'ce' or 'bce', got {self.qa_loss!r}")
        self.visual_tasks = _enabled_visual_tasks(config)
        self.lxmert = LxmertModel(config)
        self.cls = PreTrainingHeads(self.lxmert.embeddings.word_embeddings)
        dims = {
            "obj": config.num_object_labels,
            "attr": config.num_attr_labels,
            "feat": config.visual_feat_dim,
        }
        if self.visual_tasks:
            self.obj_predict_head = ObjectPredictionHead(
                config.hidden_size, {k: dims[k] for k in self.visual_tasks}
            )
        if config.task_qa:
            self.answer_head = AnswerHead(config.hidden_size, config.num_qa_labels)
        self._init_heads()

    def _init_heads(self) -> None:
        # Not the tied decoder: its weight *is* the word-embedding table initialised by HF.
        init = partial(init_bert_weights, std=self.config.initializer_range)
        self.cls.predictions.transform.apply(init)
        nn.init.zeros_(self.cls.predictions.bias)
        self.cls.seq_relationship.apply(init)
        for name in ("obj_predict_head", "answer_head"):
            if hasattr(self, name):
                getattr(self, name).apply(init)

    def tie_weights(self) -> None:
        """Re-tie the MLM decoder to the word embeddings (after loading a state dict)."""
        self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        *,
        mlm_labels: torch.Tensor | None = None,
        matched_label: torch.Tensor | None = None,
        obj_labels: torch.Tensor | None = None,
        obj_conf: torch.Tensor | None = None,
        attr_labels: torch.Tensor | None = None,
        attr_conf: torch.Tensor | None = None,
        feat_targets: torch.Tensor | None = None,
        feat_mask: torch.Tensor | None = None,
        qa_targets: torch.Tensor | None = None,
        qa_valid: torch.Tensor | None = None,
    ) -> LxmertOutput:
        """Encode and apply every head; compute the losses whose targets are given.

        Inputs: input_ids / attention_mask / token_type_ids (B, L); visual_feats (B, N, D);
        visual_pos (B, N, P) boxes normalised to [0, 1]; visual_attention_mask (B, N).
        Targets (all optional): mlm_labels (B, L) with -100 on unmasked tokens; matched_label
        (B,) 1 = matching pair; obj_labels / attr_labels (B, N) detector classes with obj_conf /
        attr_conf (B, N) their confidences; feat_targets (B, N, D) the unmasked features;
        feat_mask (B, N) 1 on masked boxes (required by obj/attr/feat); qa_targets (B, A)
        soft answer scores with qa_valid (B,) bool marking examples that carry a question.
        """
        enc = self.lxmert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            visual_feats=visual_feats,
            visual_pos=visual_pos,
            visual_attention_mask=visual_attention_mask,
            return_dict=True,
        )
        lang, vis, pooled = enc.language_output, enc.vision_output, enc.pooled_output  # (B,L,H) (B,N,H) (B,H)
        out = LxmertOutput(
            language_output=lang,
            vision_output=vis,
            pooled_output=pooled,
            mlm_logits=self.cls.predictions(lang),  # (B, L, V)
            match_logits=self.cls.seq_relationship(pooled),  # (B, 2)
        )
        if self.visual_tasks:
            visual = self.obj_predict_head(vis)
            out.obj_logits, out.attr_logits, out.feat_pred = (visual.get(k) for k in VISUAL_TASKS)
        if hasattr(self, "answer_head"):
            out.qa_logits = self.answer_head(pooled)  # (B, A)
        targets = {
            "mlm_labels": mlm_labels, "matched_label": matched_label, "obj_labels": obj_labels,
            "obj_conf": obj_conf, "attr_labels": attr_labels, "attr_conf": attr_conf,
            "feat_targets": feat_targets, "feat_mask": feat_mask, "qa_targets": qa_targets, "qa_valid": qa_valid,
        }  # fmt: skip
        out.losses = self.compute_losses(out, **targets)
        return out

    def compute_losses(self, out: LxmertOutput, **targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Separate named losses for the enabled tasks whose targets are present, plus ``loss``."""
        cfg, t = self.config, targets
        losses: dict[str, torch.Tensor] = {}
        if cfg.task_mask_lm and t["mlm_labels"] is not None:
            losses["mlm"] = masked_lm_loss(out.mlm_logits, t["mlm_labels"])
        if cfg.task_matched and t["matched_label"] is not None:
            labels = t["matched_label"]  # (B,) -100 on sentences outside the matching task
            losses["matched"] = (
                F.cross_entropy(out.match_logits, labels)
                if bool((labels != IGNORE_INDEX).any())
                else out.match_logits.sum() * 0.0  # keeps every step's loss keys and graph alike
            )
        weight = cfg.visual_loss_normalizer
        if t["feat_mask"] is not None:
            mask = t["feat_mask"].to(out.vision_output.dtype)  # (B, N)
            for key, logits in (("obj", out.obj_logits), ("attr", out.attr_logits)):
                labels, conf = t[f"{key}_labels"], t[f"{key}_conf"]
                if logits is not None and labels is not None and conf is not None:
                    losses[key] = weight * visual_class_loss(logits, labels, conf * mask)
            if out.feat_pred is not None and t["feat_targets"] is not None:
                losses["feat"] = weight * feature_regression_loss(out.feat_pred, t["feat_targets"], mask)
        if out.qa_logits is not None and t["qa_targets"] is not None:
            valid = (
                t["qa_valid"] if t["qa_valid"] is not None else torch.ones_like(t["qa_targets"][:, 0]).bool()
            )
            if t["matched_label"] is not None:
                valid = valid & (t["matched_label"] != 0)  # QA only on matching pairs
            losses["qa"] = answer_loss(out.qa_logits, t["qa_targets"], valid, self.qa_loss)
        if losses:
            losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses


class LxmertEncoder(nn.Module):
    """The LXMERT encoder as a task encoder: ``encoder(**inputs) -> pooled (B, H)``.

    What fine-tuning heads sit on (LXMERT's ``LXRTEncoder`` in the reference): the pooled
    [CLS] vector of the last cross-modality layer. Wraps a transformers ``LxmertModel``
    (e.g. ``Lxmert(...).lxmert`` after pre-training) under the name ``lxmert``.
    """

    def __init__(self, lxmert: LxmertModel):
        super().__init__()
        self.lxmert = lxmert

    @property
    def config(self) -> LxmertConfig:
        return self.lxmert.config

    @property
    def hidden_size(self) -> int:
        return self.lxmert.config.hidden_size

    @property
    def max_text_length(self) -> int:
        """Tokens per sentence used in pre-training (LXMERT: 20); HF configs lack it."""
        return int(getattr(self.lxmert.config, "max_text_length", 20))

    @property
    def max_boxes(self) -> int | None:
        """Regions per image used in pre-training (None: all of the store's); HF configs lack it."""
        return max_boxes_of(self.lxmert.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # (B, L) text and (B, N, D), (B, N, P) regions -> (B, H)
        out = self.lxmert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            visual_feats=visual_feats,
            visual_pos=visual_pos,
            visual_attention_mask=visual_attention_mask,
            return_dict=True,
        )
        return out.pooled_output


# --------------------------------------------------------------------------- losses


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked tokens only (labels -100 elsewhere); 0 when none is masked."""
    # (B, L, V), (B, L): sum then divide so a batch without masked tokens gives 0, not NaN.
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)


def visual_class_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-box cross-entropy x weight (detector confidence x mask), averaged over all boxes."""
    # (B, N, C), (B, N), (B, N) -> scalar; the mean over *all* boxes is why LXMERT scales by 6.67
    per_box = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none"
    )
    return (per_box * weight.reshape(-1)).mean()


def feature_regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SmoothL1 between predicted and original features of masked boxes, averaged over all boxes."""
    # (B, N, D) -> per box mean over D -> (B, N)
    per_box = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
    return (per_box * mask).mean()


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """QA loss over the answer table, averaged over ``valid`` rows (0 when there are none).

    ``ce``: cross-entropy against the soft scores normalised to a distribution, the expected
    value of the reference's loss (it samples one answer in proportion to its score).
    ``bce``: binary cross-entropy on the soft scores x num_answers (LXMERT's VQA fine-tuning).
    """
    # logits, targets (B, A); valid (B,)
    logits = logits.float()
    targets = targets.to(logits.dtype)
    has_answer = targets.sum(-1) > 0
    valid = valid.bool() & has_answer
    if kind == "ce":
        probs = targets / targets.sum(-1, keepdim=True).clamp(min=1e-12)
        per_row = -(probs * F.log_softmax(logits, dim=-1)).sum(-1)
    else:
        per_row = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    # Multiply instead of indexing, so every head gets a gradient (DDP needs all parameters used).
    return (per_row * valid).sum() / valid.sum().clamp(min=1)


# -------------------------------------------------------------------------- masking


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the maskable tokens are chosen; of those ``mask_frac`` become
    [MASK], ``random_frac`` a random token and the rest stay. Returns (masked ids, labels) with
    labels -100 on tokens that carry no loss. ``maskable`` (B, L) excludes [CLS]/[SEP]/[PAD].
    """
    # input_ids, maskable (B, L)
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = maskable.bool() & (u < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    how = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    masked = torch.where(chosen & (how < mask_frac), torch.full_like(input_ids, mask_token_id), input_ids)
    use_random = chosen & (how >= mask_frac) & (how < mask_frac + random_frac)
    masked = torch.where(use_random, random_ids, masked)
    return masked, labels


def _other_index(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """For each example i, a random j != i in the batch (j = i when the batch has one example)."""
    if batch == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    offset = torch.randint(1, batch, (batch,), generator=generator, device=device)
    return (torch.arange(batch, device=device) + offset) % batch


def mask_objects(
    feats: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    prob: float = 0.15,
    zero_frac: float = 0.8,
    swap_frac: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LXMERT object masking: ``prob`` of the boxes are chosen; of those ``zero_frac`` are zeroed,
    ``swap_frac`` get the feature of a random box of another image in the batch, the rest stay.
    Returns (masked feats (B, N, D), feat_mask (B, N) float, 1 on chosen boxes).
    """
    b, n, _ = feats.shape  # (B, N, D)
    u = torch.rand((b, n), generator=generator, device=feats.device)
    chosen = u < prob
    if valid is not None:
        chosen &= valid.bool()
    how = torch.rand((b, n), generator=generator, device=feats.device)
    other_img = _other_index(b, generator, feats.device)[:, None].expand(b, n)  # (B, N)
    other_box = torch.randint(n, (b, n), generator=generator, device=feats.device)
    swapped = feats[other_img, other_box]  # (B, N, D)
    zero = chosen & (how < zero_frac)
    swap = chosen & (how >= zero_frac) & (how < zero_frac + swap_frac)
    masked = torch.where(zero[..., None], torch.zeros_like(feats), feats)
    masked = torch.where(swap[..., None], swapped, masked)
    return masked, chosen.to(feats.dtype)


def swap_sentences(
    text: dict[str, torch.Tensor],
    *,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """With probability ``prob`` give an example the sentence of another example in the batch.

    ``text`` maps names to (B, L, ...) tensors swapped together (input_ids, attention_mask,
    token_type_ids). ``valid`` (B,) bool limits the task to some examples: only they are
    swapped, only with each other, and the others get label -100 (no loss). Returns (new text,
    matched_label (B,) long, 1 = kept). The reference draws the foreign sentence from the whole
    dataset; drawing it from the batch is equivalent for batches that are a random sample of it.
    """
    b = next(iter(text.values())).shape[0]
    device = next(iter(text.values())).device
    swap = torch.rand(b, generator=generator, device=device) < prob
    valid = torch.ones(b, dtype=torch.bool, device=device) if valid is None else valid.to(device)
    idx = valid.nonzero().squeeze(1)  # (M,) the examples that take part
    source = torch.arange(b, device=device)
    if idx.numel() >= 2:
        other = idx[_other_index(idx.numel(), generator, device)]  # (M,) another taking part
        source[idx] = torch.where(swap[idx], other, idx)
        swap = swap & valid
    else:
        swap = torch.zeros_like(swap)
    label = (~swap).long()
    label[~valid] = IGNORE_INDEX
    return {k: v[source] for k, v in text.items()}, label


def mask_pretrain_batch(
    batch: dict[str, torch.Tensor],
    params: LxmertModelParams,
    *,
    mask_token_id: int,
    special_token_ids: list[int],
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Turn a clean batch into LXMERT pre-training inputs and targets (formats.md §7).

    ``batch`` holds input_ids, attention_mask, token_type_ids (B, L); visual_feats (B, N, D),
    visual_pos (B, N, P); optional visual_attention_mask (B, N); obj_labels, obj_conf,
    attr_labels, attr_conf (B, N) from the detector; optional qa_targets (B, A), qa_valid (B,).
    Order: swap sentences (matching), then mask words, then mask objects. The result is the
    keyword arguments of :meth:`Lxmert.forward`. Randomness comes from ``generator`` (or the
    global torch RNG, which the training loop checkpoints).
    """
    text_keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    out = dict(batch)
    match_valid = out.pop("match_valid", None)  # (B,) sentences that take part in matching
    if params.task_matched:
        text, matched = swap_sentences(
            {k: batch[k] for k in text_keys}, prob=params.match_swap_prob, generator=generator, valid=match_valid
        )
        out.update(text, matched_label=matched)
    ids = out["input_ids"]  # (B, L)
    special = torch.isin(ids, torch.tensor(special_token_ids, device=ids.device))
    maskable = out["attention_mask"].bool() & ~special
    if params.task_mlm:
        out["input_ids"], out["mlm_labels"] = mask_tokens(
            ids, maskable, mask_token_id=mask_token_id, vocab_size=vocab_size, prob=params.mlm_prob,
            mask_frac=params.mlm_mask_frac, random_frac=params.mlm_random_frac, generator=generator,
        )  # fmt: skip
    if params.task_obj or params.task_attr or params.task_feat:
        feats = batch["visual_feats"]  # (B, N, D)
        out["feat_targets"] = feats
        out["visual_feats"], out["feat_mask"] = mask_objects(
            feats, batch.get("visual_attention_mask"), prob=params.obj_mask_prob,
            zero_frac=params.obj_zero_frac, swap_frac=params.obj_swap_frac, generator=generator,
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------ save/load


def build_lxmert(
    params: LxmertModelParams,
    *,
    vocab_size: int,
    visual_feat_dim: int,
    visual_pos_dim: int,
    num_object_labels: int,
    num_attr_labels: int,
    num_answers: int,
    feat_stats: tuple[list[float], list[float]] | None = None,
) -> Lxmert:
    """A freshly initialised LXMERT (seed torch before calling for reproducible weights)."""
    return Lxmert(
        lxmert_config(
            params,
            vocab_size=vocab_size,
            visual_feat_dim=visual_feat_dim,
            visual_pos_dim=visual_pos_dim,
            num_object_labels=num_object_labels,
            num_attr_labels=num_attr_labels,
            num_answers=num_answers,
            feat_stats=feat_stats,
        )
    )


def save_lxmert(model: Lxmert, directory: str | Path) -> None:
    """Write the HF ``save_pretrained`` layout (config.json + model.safetensors) atomically.

    The tied MLM decoder weight is stored once (under the embedding name), as HF does.
    transformers' ``LxmertForPreTraining.from_pretrained`` can read the result.
    """
    config = model.config.to_dict()
    config["architectures"] = ["LxmertForPreTraining"]
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})


def load_lxmert(directory: str | Path) -> Lxmert:
    """Load a directory written by :func:`save_lxmert` or by HF ``save_pretrained``
    (e.g. a local copy of unc-nlp/lxmert-base-uncased; safetensors or pytorch_model.bin)."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint

    directory = Path(directory)
    config = LxmertConfig.from_dict(read_json(directory / CONFIG_NAME))
    model = Lxmert(config)
    load_state_dict_into(model, read_checkpoint(directory), directory)
    return model
