"""Stages `pretrain@lxmert`, `finetune@{lxmert,xlxmert}-<task>` and `submit@...`.

Pre-training reads params ``pretrain.lxmert``; fine-tuning and submission read
``finetune.<key>``. X-LXMERT fine-tunes exactly like LXMERT (same task objects, loop and
metrics); only its encoder (``models/pretrained/xlxmert``) and its visual input (continuous
grid features instead of regions) differ. Sizes come from upstream meta.json files: vocab (tokenizer), feature
dim and boxes (region store), object/attribute labels (detector), answers (world).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from vlpipe.config import FinetuneParams, LxmertPretrainParams, load_section
from vlpipe.data.examples import ExampleDataset
from vlpipe.data.tokenizer import load_tokenizer
from vlpipe.data.visual import GridInputs, RegionInputs, feature_statistics
from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, read_json, read_meta, write_json, write_metrics

WORLD = Path("data/world")
TOKENIZER = Path("data/tokenizer")
REGION = Path("data/features/region")
GRID = Path("data/features/grid")
DETECTOR = Path("models/detector")
PRETRAINED = Path("models/pretrained")
FINETUNED = Path("models/finetuned")
RUNS = Path("runs")  # persistent checkpoints (DVC `persist: true`) so a killed stage resumes
LIVE = Path("dvclive")


def _clear_checkpoints(root: Path, name: str) -> None:
    """A finished run's checkpoints are deleted: they exist only to resume a killed stage, and a
    later re-run (e.g. after upstream data changed) must start fresh rather than 'resume' at the end."""
    shutil.rmtree(root / RUNS / name / "checkpoints", ignore_errors=True)


# ------------------------------------------------------------------ pre-training


def run_pretrain(params_path: Path, root: Path) -> None:
    from vlpipe.data.pretrain import make_pretrain_collate, pretrain_answer_table, pretrain_examples
    from vlpipe.models.convert import load_reference_checkpoint
    from vlpipe.models.lxmert import build_lxmert, mask_pretrain_batch, region_inputs, save_lxmert
    from vlpipe.train.loop import fit, seed_everything

    p: LxmertPretrainParams = load_section("pretrain", params_path).lxmert
    tok = load_tokenizer(root / TOKENIZER)
    raw = RegionInputs(root / REGION, p.model.max_boxes)
    det = read_meta(root / DETECTOR)
    train_ex = pretrain_examples(root / WORLD / "lxmert/train.json")
    val_ex = pretrain_examples(root / WORLD / "lxmert/val.json")[: p.val_max_examples]
    label2ans = pretrain_answer_table(train_ex, p.min_answer_count)
    ans2label = {a: i for i, a in enumerate(label2ans)}

    stats = (
        feature_statistics(raw, [ex.img_ids[0] for ex in train_ex]) if p.model.standardize_features else None
    )
    seed_everything(p.train.seed)
    model = build_lxmert(
        p.model,
        vocab_size=len(tok),
        visual_feat_dim=raw.feat_dim,
        visual_pos_dim=raw.pos_dim,
        num_object_labels=len(det["objects"]),
        num_attr_labels=len(det["attributes"]),
        num_answers=len(label2ans),
        feat_stats=stats,
    )
    visual = region_inputs(model.config, root / REGION)
    if p.init:
        # A reference checkpoint's own answer table differs from ours: keep our fresh QA head.
        load_reference_checkpoint(
            model, p.init, allow_missing=("answer_head.",), allow_unexpected=("answer_head.",)
        )
    collate = make_pretrain_collate(tok, visual, ans2label, p.model.max_text_length, p.match_sources)
    mask_kw = {
        "mask_token_id": tok.mask_token_id,
        "special_token_ids": tok.all_special_ids,
        "vocab_size": len(tok),
    }

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return m(**mask_pretrain_batch(batch, p.model, **mask_kw)).losses

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return pretrain_val_metrics(m, val_ex, collate, p, mask_kw)

    fingerprint = json.dumps(
        {"model": p.model.model_dump(mode="json"), "init": p.init, "answers": len(label2ans),
         "match_sources": p.match_sources}
    )
    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, p.train, root / RUNS / "pretrain-lxmert",
        eval_fn=eval_fn, live_dir=root / LIVE / "pretrain-lxmert", fingerprint=fingerprint,
    )  # fmt: skip
    with atomic_dir(root / PRETRAINED / "lxmert") as tmp:
        save_lxmert(result.model, tmp)
        write_json(tmp / "answers.json", label2ans)
        write_json(
            tmp / "meta.json", {"model": "lxmert", "num_answers": len(label2ans), "feature_kind": "region"}
        )
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step,
               "train_examples": len(train_ex), "samples_per_second": result.samples_per_second}  # fmt: skip
    write_metrics(root / "metrics/pretrain/lxmert.json", metrics)
    _clear_checkpoints(root, "pretrain-lxmert")


@torch.no_grad()
def pretrain_val_metrics(
    model: torch.nn.Module, examples: list, collate: Any, p: LxmertPretrainParams, mask_kw: dict
) -> dict[str, float]:
    """Each pre-training loss on val (masking drawn from a fixed generator, so the numbers
    are comparable across steps and runs), plus masked-LM accuracy and QA top-1 accuracy."""
    from vlpipe.models.lxmert import IGNORE_INDEX, mask_pretrain_batch

    gen = torch.Generator().manual_seed(1234)
    sums: dict[str, float] = {}
    n_batches, mlm_right, mlm_total, qa_right, qa_total, match_right, match_total = 0, 0, 0, 0.0, 0, 0, 0
    for start in range(0, len(examples), p.eval_batch_size):
        batch = collate(examples[start : start + p.eval_batch_size])
        inputs = mask_pretrain_batch(batch, p.model, generator=gen, **mask_kw)
        out = model(**inputs)
        for k, v in out.losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_batches += 1
        labels = inputs.get("mlm_labels")
        if labels is not None:
            sel = labels != IGNORE_INDEX
            mlm_right += int((out.mlm_logits.argmax(-1)[sel] == labels[sel]).sum())
            mlm_total += int(sel.sum())
        matched = inputs.get("matched_label")  # (B,) -100 outside the matching task
        if matched is not None:
            sel = matched != IGNORE_INDEX
            match_right += int((out.match_logits.argmax(-1)[sel] == matched[sel]).sum())
            match_total += int(sel.sum())
        if out.qa_logits is not None:
            valid = batch["qa_valid"] & (matched != 0 if matched is not None else True)
            best = out.qa_logits.argmax(-1)  # (B,)
            # VQA-style score of the top answer: its soft score in the target.
            qa_right += float(batch["qa_targets"][torch.arange(len(best)), best][valid].sum())
            qa_total += int(valid.sum())
    metrics = {f"loss_{k}": v / max(n_batches, 1) for k, v in sums.items()}
    if mlm_total:
        metrics["mlm_accuracy"] = mlm_right / mlm_total
    if qa_total:
        metrics["qa_score"] = qa_right / qa_total
    if match_total:
        metrics["matched_accuracy"] = match_right / match_total
    return metrics


# ------------------------------------------------------------------ fine-tuning


def _finetune_params(key: str, params_path: Path) -> FinetuneParams:
    section = load_section("finetune", params_path)
    if key not in section:
        raise InputError(params_path, f"no finetune entry {key!r} (have: {', '.join(sorted(section))})")
    return section[key]


def visual_inputs(model: str, config: Any, root: Path) -> Any:
    """What a fine-tuned encoder reads: LXMERT region features (with the checkpoint's box cap
    and input statistics) or X-LXMERT continuous grid features."""
    if model == "xlxmert":
        return GridInputs(root / GRID)
    from vlpipe.models.lxmert import region_inputs

    return region_inputs(config, root / REGION)


def build_task_model(p: FinetuneParams, task: Any, root: Path):
    """Encoder initialised per ``p.init`` + a fresh task head (QA rows transferred from the
    pre-training answer head where answers overlap, as LXMERT's ``load_lxmert_qa``)."""
    from transformers import LxmertConfig

    from vlpipe.models.convert import load_reference_checkpoint, transfer_answer_head
    from vlpipe.models.lxmert import Lxmert, LxmertEncoder, load_lxmert
    from vlpipe.tasks.base import TaskModel
    from vlpipe.train.loop import seed_everything

    pre_dir = root / PRETRAINED / p.model
    seed_everything(p.train.seed)
    if Path(p.start_from) != PRETRAINED / p.model:
        # Intermediate-task transfer (params ``start_from``): another fine-tuning's encoder,
        # a fresh head; with ``init: scratch`` only its architecture.
        encoder = load_task_encoder(root / p.start_from, p.model, weights=p.init != "scratch")
        return TaskModel(encoder, task.build_head(encoder.hidden_size), task.num_images), 0
    if p.model == "xlxmert":
        # No QA pre-training in X-LXMERT: nothing to transfer into the head.
        from vlpipe.models.xlxmert import load_pretrained_encoder

        source = pre_dir if p.init in ("pretrained", "scratch") else Path(p.init)
        encoder = load_pretrained_encoder(source, pretrained=p.init != "scratch")
        return TaskModel(encoder, task.build_head(encoder.hidden_size), task.num_images), 0
    if p.init == "pretrained":
        pre = load_lxmert(pre_dir)
    elif p.init == "scratch":
        pre = Lxmert(LxmertConfig.from_dict(read_json(pre_dir / "config.json")))
    else:
        pre = Lxmert(LxmertConfig.from_dict(read_json(pre_dir / "config.json")))
        load_reference_checkpoint(pre, p.init, allow_missing=("answer_head.", "obj_predict_head.", "cls."),
                                  allow_unexpected=("answer_head.", "obj_predict_head.", "cls.", "logit_fc."))  # fmt: skip
    encoder = LxmertEncoder(pre.lxmert)
    head = task.build_head(encoder.hidden_size)
    copied = 0
    if p.init == "pretrained" and hasattr(pre, "answer_head") and hasattr(task, "label2ans"):
        old = {
            k.removeprefix("answer_head."): v
            for k, v in pre.answer_head.state_dict(prefix="answer_head.").items()
        }
        new_state, copied = transfer_answer_head(
            old,
            read_json(pre_dir / "answers.json"),
            task.label2ans,
            init=head.state_dict(),
            prefix="logit_fc.3.",
        )
        head.load_state_dict(new_state)
    return TaskModel(encoder, head, task.num_images), copied


def run_finetune(key: str, params_path: Path, root: Path) -> None:
    from vlpipe.tasks import TASKS
    from vlpipe.tasks.base import make_collate, predict_all
    from vlpipe.train.loop import fit

    p = _finetune_params(key, params_path)
    task = TASKS[p.task](root / WORLD)
    tok = load_tokenizer(root / TOKENIZER)
    model, copied = build_task_model(p, task, root)
    visual = visual_inputs(p.model, model.encoder.config, root)
    max_len = int(model.encoder.max_text_length)
    collate = make_collate(task, tok, visual, max_len, mark_sides=p.mark_sides)
    train_ex, val_ex = task.examples("train"), task.examples("val")
    if p.swap_sides:
        from vlpipe.tasks.nlvr2 import swap_sides

        train_ex += swap_sides(train_ex)
    if p.mirror != "none":
        from vlpipe.tasks.mirror import mirror_examples

        train_ex += mirror_examples(train_ex, p.mirror)

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return task.loss(m(batch["inputs"]), batch["targets"])

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return _flat(task.metric(predict_all(m, task, val_ex, collate, p.eval_batch_size), "val"))

    fingerprint = json.dumps({"key": key, "init": p.init, "start_from": p.start_from, "swap_sides": p.swap_sides,
                              "mark_sides": p.mark_sides, "mirror": p.mirror})
    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, p.train, root / RUNS / f"finetune-{key}",
        eval_fn=eval_fn, live_dir=root / LIVE / f"finetune-{key}", fingerprint=fingerprint,
    )  # fmt: skip
    save_task_model(result.model, task, p, root / FINETUNED / key)
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step, "init": p.init,
               "answers_transferred": copied, "samples_per_second": result.samples_per_second}  # fmt: skip
    write_metrics(root / f"metrics/finetune/{key}.json", metrics)
    _clear_checkpoints(root, f"finetune-{key}")


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)):
            out[prefix + k.replace("/", "_")] = float(v)
    return out


def save_task_model(model: Any, task: Any, p: FinetuneParams, out_dir: Path) -> None:
    """config.json (the encoder's HF config) + model.safetensors (encoder.* and head.*) + task.json."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(model.encoder.config.to_json_string(), encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "task.json", {"model": p.model, "task": p.task, "num_images": task.num_images})


def load_task_encoder(model_dir: Path, model: str, *, weights: bool = True):
    """The encoder of a task model written by :func:`save_task_model` (its head is dropped),
    for a fine-tuning that starts from another one; ``weights=False``: its architecture only."""
    from transformers import LxmertConfig, LxmertModel

    from vlpipe.models.convert import TIED_KEY, load_state_dict_into, read_checkpoint
    from vlpipe.models.lxmert import LxmertEncoder

    info = read_json(model_dir / "task.json")
    if info.get("model") != model:
        raise InputError(model_dir / "task.json", f"expected a fine-tuned {model!r} model, got {info.get('model')!r}")
    encoder = LxmertEncoder(LxmertModel(LxmertConfig.from_dict(read_json(model_dir / "config.json"))))
    if weights:
        prefix = "encoder."
        state = {k.removeprefix(prefix): v for k, v in read_checkpoint(model_dir).items() if k.startswith(prefix)}
        # (the loader adds the MLM decoder tied to the word embeddings: an encoder has none)
        load_state_dict_into(encoder, state, model_dir, allow_unexpected=(TIED_KEY,))
    return encoder


def load_task_model(model_dir: Path, task: Any):
    """Rebuild a fine-tuned model written by :func:`save_task_model`; checks every key and shape."""
    from transformers import LxmertConfig, LxmertModel

    from vlpipe.models.convert import load_state_dict_into, read_checkpoint
    from vlpipe.models.lxmert import LxmertEncoder
    from vlpipe.tasks.base import TaskModel

    info = read_json(model_dir / "task.json")
    if info["task"] != task.name:
        raise InputError(
            model_dir / "task.json", f"model was fine-tuned for {info['task']!r}, not {task.name!r}"
        )
    if info.get("model") not in ("lxmert", "xlxmert"):
        raise InputError(model_dir / "task.json", f"not an LXMERT / X-LXMERT task model: {info.get('model')!r}")
    config = LxmertConfig.from_dict(read_json(model_dir / "config.json"))
    encoder = LxmertEncoder(LxmertModel(config))
    model = TaskModel(encoder, task.build_head(encoder.hidden_size), task.num_images)
    load_state_dict_into(model, read_checkpoint(model_dir), model_dir)
    model.eval()
    return model


# ------------------------------------------------------------------ leaderboard


def run_submit(key: str, params_path: Path, root: Path) -> None:
    """Predict the test split into the official file under leaderboard/<key>/ and score it
    against the hidden answers (the local leaderboard, the only reader of data/world/hidden)."""
    from vlpipe.eval.leaderboard import score_submission
    from vlpipe.tasks import TASKS
    from vlpipe.tasks.base import make_collate, predict_all

    p = _finetune_params(key, params_path)
    task = TASKS[p.task](root / WORLD)
    model = load_task_model(root / FINETUNED / key, task)
    visual = visual_inputs(p.model, model.encoder.config, root)
    collate = make_collate(task, load_tokenizer(root / TOKENIZER), visual, int(model.encoder.max_text_length),
                           with_targets=False, mark_sides=p.mark_sides)  # fmt: skip
    preds = predict_all(model, task, task.examples("test"), collate, p.eval_batch_size)
    with atomic_dir(root / "leaderboard" / key) as tmp:
        task.write_submission(preds, tmp)
    path = task.submission_path(root / "leaderboard" / key)
    write_metrics(root / f"metrics/leaderboard/{key}.json", score_submission(task, path))
