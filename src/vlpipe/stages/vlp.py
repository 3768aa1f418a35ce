"""Stages `pretrain@vlp`, `finetune@vlp-caption`, `submit@vlp-caption`, `finetune@vlp-<task>`
and `submit@vlp-<task>` (VQA and the other classification tasks).

Each ``run_*`` reads its params section and calls the function below it, which takes the
params object (what tests call). Sizes come from upstream: vocabulary and special tokens
(tokenizer), region feature dim (region store meta.json). Captions and image ids come from
``data/world/karpathy/dataset_coco.json``; test references only from ``data/world/hidden``
through the local leaderboard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vlpipe.config import CaptionParams, TrainParams, VlpPretrainParams, load_section
from vlpipe.data.examples import Example, ExampleDataset
from vlpipe.data.tokenizer import load_tokenizer
from vlpipe.data.visual import RegionInputs
from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, read_json, write_json, write_metrics

WORLD = Path("data/world")
TOKENIZER = Path("data/tokenizer")
REGION = Path("data/features/region")
PRETRAINED = Path("models/pretrained/vlp")
FINETUNED = Path("models/finetuned")
LEADERBOARD = Path("leaderboard")
RUNS = Path("runs")  # persistent checkpoints (DVC `persist: true`) so a killed stage resumes
LIVE = Path("dvclive")
CAPTION_KEY = "vlp-caption"
VAL_RESULTS = "val_results.json"



def _clear_checkpoints(root: Path, name: str) -> None:
    """A finished run's checkpoints only existed to resume a killed stage: drop them."""
    shutil.rmtree(root / RUNS / name / "checkpoints", ignore_errors=True)


def _visual(root: Path, config: Any) -> Any:
    """The region store as VLP sees it: the first ``config.max_regions`` boxes, 6-d box encoding,
    features standardised with the model's input statistics when its config has them."""
    from vlpipe.models.vlp import VlpVisual

    regions = RegionInputs(
        root / REGION, None, getattr(config, "visual_feat_mean", None), getattr(config, "visual_feat_std", None)
    )
    return VlpVisual(regions, getattr(config, "max_regions", None))


def _special_ids(tok: Any) -> dict[str, int]:
    return {"cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
            "mask_token_id": tok.mask_token_id, "pad_token_id": tok.pad_token_id}  # fmt: skip


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP (decoding calls methods other than forward)."""
    return getattr(model, "module", model)


# ------------------------------------------------------------------ pre-training


def run_pretrain(params_path: Path, root: Path) -> None:
    """Stage ``pretrain@vlp`` (params ``pretrain.vlp``)."""
    pretrain_vlp(load_section("pretrain", params_path).vlp, root)


def pretrain_vlp(p: VlpPretrainParams, root: Path) -> dict[str, Any]:
    """Masked vision-language pre-training on the world's training captions; seq2seq or
    bidirectional mask per example (``s2s_prob`` / ``bi_prob``). Writes models/pretrained/vlp
    (config.json + model.safetensors + meta.json) and metrics/pretrain/vlp.json."""
    from vlpipe.models.vlp import build_vlp, mask_caption_batch, sample_s2s, save_vlp
    from vlpipe.tasks.caption import CaptionTask, make_caption_collate
    from vlpipe.train.loop import fit, seed_everything

    tok = load_tokenizer(root / TOKENIZER)
    visual = _visual(root, p.model)
    task = CaptionTask(root / WORLD)
    train_ex = task.caption_examples("train")
    val_ex = task.caption_examples("val")[: p.val_max_examples]
    stats = None
    if p.model.standardize_features:
        from vlpipe.data.visual import feature_statistics

        # Statistics of the boxes the model reads (its first max_regions), over training images.
        images = sorted({ex.img_ids[0] for ex in train_ex})
        stats = feature_statistics(RegionInputs(root / REGION, p.model.max_regions), images)
        visual = _visual(root, SimpleNamespace(max_regions=p.model.max_regions,
                                               visual_feat_mean=stats[0], visual_feat_std=stats[1]))  # fmt: skip
    seed_everything(p.train.seed)
    model = build_vlp(p.model, vocab_size=len(tok), visual_feat_dim=visual.feat_dim, feat_stats=stats,
                      **_special_ids(tok))  # fmt: skip
    collate = make_caption_collate(tok, visual, p.model.max_text_length)
    vocab = len(tok)
    mask_kw = {"mask_token_id": tok.mask_token_id, "vocab_size": vocab, "prob": p.model.mask_prob,
               "mask_frac": p.model.mask_frac, "random_frac": p.model.random_frac}  # fmt: skip

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, labels = mask_caption_batch(batch["input_ids"], batch["attention_mask"], **mask_kw)
        s2s = sample_s2s(ids.shape[0], p.s2s_prob).to(ids.device)
        return m(batch["visual_feats"], batch["visual_pos"], ids, batch["attention_mask"], s2s=s2s, mlm_labels=labels).losses

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return mlm_val_metrics(m, val_ex, collate, p.eval_batch_size, mask_kw)

    fingerprint = json.dumps({"model": p.model.model_dump(mode="json"), "s2s_prob": p.s2s_prob, "vocab": vocab})
    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, p.train, root / RUNS / "pretrain-vlp",
        eval_fn=eval_fn, live_dir=root / LIVE / "pretrain-vlp", fingerprint=fingerprint,
    )  # fmt: skip
    with atomic_dir(root / PRETRAINED) as tmp:
        save_vlp(result.model, tmp)
        write_json(tmp / "meta.json", {"model": "vlp", "feature_kind": "region", "train_captions": len(train_ex)})
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step,
               "train_examples": len(train_ex), "samples_per_second": result.samples_per_second}  # fmt: skip
    write_metrics(root / "metrics/pretrain/vlp.json", metrics)
    _clear_checkpoints(root, "pretrain-vlp")
    return metrics


@torch.no_grad()
def mlm_val_metrics(
    model: torch.nn.Module, examples: list[Example], collate: Any, batch_size: int, mask_kw: dict[str, Any]
) -> dict[str, float]:
    """Masked-LM loss and accuracy of val captions under each mask (``s2s``, ``bi``): the same
    masked tokens (a fixed generator) scored once per mask, comparable across steps and runs.
    ``mask_kw``: the keyword arguments of :func:`vlpipe.models.vlp.mask_caption_batch`."""
    from vlpipe.models.vlp import IGNORE_INDEX, mask_caption_batch

    gen = torch.Generator().manual_seed(1234)
    sums = {f"{k}_{m}": 0.0 for k in ("loss", "right") for m in ("s2s", "bi")}
    total = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        ids, labels = mask_caption_batch(batch["input_ids"], batch["attention_mask"], generator=gen, **mask_kw)
        sel = labels != IGNORE_INDEX  # (B, L)
        total += int(sel.sum())
        for mode in ("s2s", "bi"):
            s2s = torch.full((ids.shape[0],), mode == "s2s")
            out = model(batch["visual_feats"], batch["visual_pos"], ids, batch["attention_mask"], s2s=s2s, mlm_labels=labels)
            sums[f"loss_{mode}"] += float(out.losses["loss"]) * int(sel.sum())
            sums[f"right_{mode}"] += int((out.mlm_logits.argmax(-1)[sel] == labels[sel]).sum())
    n = max(total, 1)
    losses = {f"loss_mlm_{m}": sums[f"loss_{m}"] / n for m in ("s2s", "bi")}
    return losses | {f"mlm_accuracy_{m}": sums[f"right_{m}"] / n for m in ("s2s", "bi")}


# ------------------------------------------------------------------ captioning


def caption_params(key: str, params_path: Path) -> CaptionParams:
    """The ``finetune.<key>`` entry (a :class:`CaptionParams`)."""
    section = load_section("finetune", params_path)
    if key not in section:
        raise InputError(params_path, f"no finetune entry {key!r} (have: {', '.join(sorted(section))})")
    return section[key]


def run_finetune_caption(key: str, params_path: Path, root: Path) -> None:
    """Stage ``finetune@vlp-caption`` (params ``finetune.vlp-caption``)."""
    finetune_caption(caption_params(key, params_path), root, key)


def _init_vlp(init: str, root: Path, seed: int) -> Any:
    """The pre-trained VLP, or (``scratch``) the same architecture with fresh weights."""
    from vlpipe.models.vlp import Vlp, load_vlp, load_vlp_config
    from vlpipe.train.loop import seed_everything

    seed_everything(seed)
    if init == "pretrained":
        return load_vlp(root / PRETRAINED)
    if init == "scratch":
        return Vlp(load_vlp_config(root / PRETRAINED))
    raise InputError("params.yaml", f"init must be 'pretrained' or 'scratch' for VLP, got {init!r}")


def finetune_caption(p: CaptionParams, root: Path, key: str = CAPTION_KEY) -> dict[str, Any]:
    """Seq2seq fine-tuning for captioning, then (``p.scst``) self-critical sequence training.

    Writes models/finetuned/<key> (config.json, model.safetensors, task.json, val results) and
    metrics/finetune/<key>.json: val BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE (or why it
    was skipped); with SCST also ``val_xe``, the numbers after cross-entropy alone.
    """
    from vlpipe.models.vlp import mask_caption_batch, save_vlp
    from vlpipe.tasks.caption import CaptionTask, generate_captions, make_caption_collate, write_results
    from vlpipe.train.loop import fit

    task = CaptionTask(root / WORLD)
    tok = load_tokenizer(root / TOKENIZER)
    model = _init_vlp(p.init, root, p.train.seed)
    visual = _visual(root, model.config)
    collate = make_caption_collate(tok, visual, int(model.config.max_text_length))
    val_images = task.image_examples("val")[: p.val_max_images]
    decoding = {"beam_size": p.beam_size, "max_length": p.max_length, "length_penalty": p.length_penalty}
    last: dict[str, dict[int, str]] = {}

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        # Quick metrics for the curves (no METEOR/SPICE); the final ones are computed once below.
        last["val"] = generate_captions(m, val_images, visual, tok, batch_size=p.eval_batch_size, **decoding)
        scores = task.metric(last["val"], "val", meteor=False, spice=False)
        return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, labels = mask_caption_batch(
            batch["input_ids"], batch["attention_mask"], mask_token_id=tok.mask_token_id, vocab_size=len(tok),
            prob=p.mask_prob,
        )  # fmt: skip
        s2s = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)  # captioning: seq2seq only
        losses = m(batch["visual_feats"], batch["visual_pos"], ids, batch["attention_mask"], s2s=s2s, mlm_labels=labels).losses
        return {"mlm_s2s": losses["mlm_s2s"], "loss": losses["loss"]}

    fingerprint = json.dumps({"key": key, "init": p.init, "mask_prob": p.mask_prob, "decoding": decoding})
    result = fit(
        model, loss_fn, ExampleDataset(task.caption_examples("train")), collate, p.train,
        root / RUNS / f"finetune-{key}", eval_fn=eval_fn, live_dir=root / LIVE / f"finetune-{key}", fingerprint=fingerprint,
    )  # fmt: skip
    metrics: dict[str, Any] = {"init": p.init, "steps": result.step, "train": result.losses,
                               "samples_per_second": result.samples_per_second, "decoding": decoding}  # fmt: skip
    if p.scst:
        metrics["val_xe"] = task.metric(last["val"], "val", spice=False)
        scst = fit(
            result.model, scst_loss_fn(task, tok, p), ExampleDataset(task.image_examples("train")),
            _image_collate(visual), p.scst_train, root / RUNS / f"finetune-{key}-scst",
            eval_fn=eval_fn, live_dir=root / LIVE / f"finetune-{key}-scst", fingerprint=fingerprint + "/scst",
        )  # fmt: skip
        metrics |= {"scst_steps": scst.step, "scst_train": scst.losses}
    metrics["val"] = task.metric(last["val"], "val")  # every metric, SPICE when its models are installed
    with atomic_dir(root / FINETUNED / key) as tmp:
        save_vlp(result.model, tmp)
        write_json(tmp / "task.json", {"model": "vlp", "task": "caption", **decoding})
        write_results(tmp / VAL_RESULTS, last["val"])
    write_metrics(root / f"metrics/finetune/{key}.json", metrics)
    _clear_checkpoints(root, f"finetune-{key}")
    _clear_checkpoints(root, f"finetune-{key}-scst")
    return metrics


def _image_collate(visual: Any) -> Any:
    from vlpipe.tasks.caption import make_image_collate

    return make_image_collate(visual)


def scst_loss_fn(task: Any, tok: Any, p: CaptionParams) -> Any:
    """Self-critical sequence training (Rennie et al. 2017) as VLP fine-tunes captioning.

    Per image: a caption sampled from the model (multinomial, global torch RNG) and the greedy
    caption (eval mode, the baseline); reward = CIDEr-D (idf of the training references) of the
    sample minus that of the greedy caption; loss = -reward x log p(sample), averaged over the
    sampled tokens (incl. the final [SEP]). Logs ``scst``, ``loss``, ``reward_sample`` and
    ``reward_greedy`` (mean CIDEr-D of each).
    """
    from vlpipe.eval.caption import CiderD
    from vlpipe.models.vlp import greedy_decode, strip_caption
    from vlpipe.tasks.caption import captions_text

    train_refs = {ex.key: list(ex.target) for ex in task.image_examples("train")}
    cider = CiderD(train_refs)

    def rewards(tokens: torch.Tensor, examples: list[Example]) -> torch.Tensor:
        sep = tok.sep_token_id
        texts = captions_text(tok, [strip_caption(row, sep) for row in tokens.tolist()])
        keys = [ex.key for ex in examples]
        return torch.from_numpy(cider.scores(texts, [train_refs[k] for k in keys], keys)).float()  # (B,)

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raw = _unwrap(m)
        vis = (batch["visual_feats"], batch["visual_pos"], batch.get("visual_attention_mask"))
        raw.eval()
        greedy = greedy_decode(raw, *vis, max_length=p.max_length)
        raw.train()
        sampled = greedy_decode(raw, *vis, max_length=p.max_length, sample=True)  # (B, T)
        r_sample, r_greedy = rewards(sampled, batch["examples"]), rewards(greedy, batch["examples"])
        advantage = (r_sample - r_greedy).to(sampled.device)  # (B,)
        logp = m(*vis[:2], visual_attention_mask=vis[2], caption_tokens=sampled).token_log_probs  # (B, T)
        keep = _through_first_sep(sampled, tok.sep_token_id)  # (B, T)
        loss = -(advantage[:, None] * logp * keep).sum() / keep.sum().clamp(min=1)
        return {"scst": loss, "loss": loss, "reward_sample": r_sample.mean(), "reward_greedy": r_greedy.mean()}

    return loss_fn


def _through_first_sep(tokens: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """(B, T) float: 1 on each row's tokens up to and including its first [SEP]."""
    is_sep = (tokens == sep_token_id).long()
    after = (is_sep.cumsum(dim=1) - is_sep) > 0  # strictly after the first [SEP]
    return (~after).float()


def run_submit_caption(key: str, params_path: Path, root: Path) -> None:
    """Stage ``submit@vlp-caption``."""
    submit_caption(caption_params(key, params_path), root, key)


def submit_caption(p: CaptionParams, root: Path, key: str = CAPTION_KEY) -> dict[str, Any]:
    """Caption the test images into leaderboard/<key>/captions_test_results.json and score it
    against the hidden references (the local leaderboard)."""
    from vlpipe.eval.leaderboard import score_submission
    from vlpipe.models.vlp import load_vlp
    from vlpipe.tasks.caption import CaptionTask, generate_captions

    task = CaptionTask(root / WORLD)
    model = load_vlp(root / FINETUNED / key)
    preds = generate_captions(
        model, task.image_examples("test"), _visual(root, model.config), load_tokenizer(root / TOKENIZER),
        batch_size=p.eval_batch_size, beam_size=p.beam_size, max_length=p.max_length, length_penalty=p.length_penalty,
    )  # fmt: skip
    with atomic_dir(root / LEADERBOARD / key) as tmp:
        task.write_submission(preds, tmp)
    metrics = score_submission(task, task.submission_path(root / LEADERBOARD / key))
    write_metrics(root / f"metrics/leaderboard/{key}.json", metrics)
    return metrics


# --------------------------------------------------------- classification tasks (VQA)


def build_task_model(init: str, task: Any, root: Path, seed: int) -> Any:
    """``TaskModel(VlpEncoder, task head)``: VLP under the bidirectional mask, pooled [CLS] x [SEP]."""
    from vlpipe.models.vlp import VlpEncoder
    from vlpipe.tasks.base import TaskModel

    encoder = VlpEncoder(_init_vlp(init, root, seed).bert)
    return TaskModel(encoder, task.build_head(encoder.hidden_size), task.num_images)


def load_task_model(model_dir: Path, task: Any) -> Any:
    """Rebuild a model written by :func:`finetune_task`; checks every key and shape."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint
    from vlpipe.models.vlp import VlpBackbone, VlpEncoder, load_vlp_config
    from vlpipe.tasks.base import TaskModel

    info = read_json(model_dir / "task.json")
    if info.get("task") != task.name or info.get("model") != "vlp":
        raise InputError(model_dir / "task.json", f"not a VLP model fine-tuned for {task.name!r}: {info}")
    encoder = VlpEncoder(VlpBackbone(load_vlp_config(model_dir)))
    model = TaskModel(encoder, task.build_head(encoder.hidden_size), task.num_images)
    load_state_dict_into(model, read_checkpoint(model_dir), model_dir)
    return model.eval()


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)):
            out[prefix + k.replace("/", "_")] = float(v)
    return out


def text_length(tok: Any, examples: list[Example], cap: int) -> int:
    """Tokens of the longest sentence of ``examples`` ([CLS] and [SEP] included), at most ``cap``.

    Task collates pad every batch to one length: the data's longest question rather than the
    caption length the model was built for keeps VQA inputs short (LXMERT fixes 20).
    """
    lengths = tok([ex.sent for ex in examples], add_special_tokens=True)["input_ids"]
    return min(cap, max(len(ids) for ids in lengths))


def run_finetune_task(key: str, params_path: Path, root: Path) -> None:
    """Stage ``finetune@vlp-<task>`` (params ``finetune.<key>``: task, init, train, eval_batch_size)."""
    p = load_section("finetune", params_path).get(key)
    if p is None:
        raise InputError(params_path, f"no finetune entry {key!r}")
    finetune_task(key, p.task, p.init, p.train, p.eval_batch_size, root)


def finetune_task(key: str, task_name: str, init: str, train: TrainParams, eval_batch_size: int, root: Path) -> dict[str, Any]:
    """Fine-tune VLP on a classification task (VQA: soft-score BCE over the answer table, as
    LXMERT, the same :class:`~vlpipe.tasks.VqaTask` and official metric). Writes
    models/finetuned/<key> and metrics/finetune/<key>.json."""
    from safetensors.torch import save_file

    from vlpipe.tasks import TASKS
    from vlpipe.tasks.base import make_collate, predict_all
    from vlpipe.train.loop import fit

    task = TASKS[task_name](root / WORLD)
    tok = load_tokenizer(root / TOKENIZER)
    model = build_task_model(init, task, root, train.seed)
    train_ex, val_ex = task.examples("train"), task.examples("val")
    max_length = text_length(tok, [*train_ex, *val_ex], int(model.encoder.max_text_length))
    collate = make_collate(task, tok, _visual(root, model.encoder.config), max_length)

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return task.loss(m(batch["inputs"]), batch["targets"])

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return _flatten(task.metric(predict_all(m, task, val_ex, collate, eval_batch_size), "val"))

    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, train, root / RUNS / f"finetune-{key}",
        eval_fn=eval_fn, live_dir=root / LIVE / f"finetune-{key}", fingerprint=json.dumps({"key": key, "init": init}),
    )  # fmt: skip
    with atomic_dir(root / FINETUNED / key) as tmp:
        (tmp / "config.json").write_text(result.model.encoder.config.to_json_string(), encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in result.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "task.json", {"model": "vlp", "task": task.name, "num_images": task.num_images,
                                       "max_text_length": max_length})  # fmt: skip
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step, "init": init,
               "samples_per_second": result.samples_per_second}  # fmt: skip
    write_metrics(root / f"metrics/finetune/{key}.json", metrics)
    _clear_checkpoints(root, f"finetune-{key}")
    return metrics


def run_submit_task(key: str, params_path: Path, root: Path) -> None:
    """Stage ``submit@vlp-<task>``."""
    p = load_section("finetune", params_path).get(key)
    if p is None:
        raise InputError(params_path, f"no finetune entry {key!r}")
    submit_task(key, p.task, p.eval_batch_size, root)


def submit_task(key: str, task_name: str, eval_batch_size: int, root: Path) -> dict[str, Any]:
    """Official test file under leaderboard/<key>/ and its local leaderboard score."""
    from vlpipe.eval.leaderboard import score_submission
    from vlpipe.tasks import TASKS
    from vlpipe.tasks.base import make_collate, predict_all

    task = TASKS[task_name](root / WORLD)
    model_dir = root / FINETUNED / key
    model = load_task_model(model_dir, task)
    max_length = int(read_json(model_dir / "task.json")["max_text_length"])
    visual = _visual(root, model.encoder.config)
    collate = make_collate(task, load_tokenizer(root / TOKENIZER), visual, max_length, with_targets=False)
    preds = predict_all(model, task, task.examples("test"), collate, eval_batch_size)
    with atomic_dir(root / LEADERBOARD / key) as tmp:
        task.write_submission(preds, tmp)
    metrics = score_submission(task, task.submission_path(root / LEADERBOARD / key))
    write_metrics(root / f"metrics/leaderboard/{key}.json", metrics)
    return metrics
