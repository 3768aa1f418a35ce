"""Reference LXMERT checkpoints -> our layout (formats.md §6).

Three layouts are understood:

- ``model_LXRT.pth``, the pre-trained reference (Tan & Bansal 2019), saved from
  ``nn.DataParallel``: ``module.bert.*`` (encoder), ``module.cls.*``,
  ``module.obj_predict_head.*``, ``module.answer_head.*``;
- fine-tuned ``BEST.pth`` files: ``lxrt_encoder.model.bert.*`` (optionally with ``module.``
  after ``model.``) and the task head ``logit_fc.*``;
- HF / ours: ``lxmert.*``, ``cls.*``, ``obj_predict_head.*``, ``answer_head.*`` in a directory
  with config.json and model.safetensors (or pytorch_model.bin, or sharded indexes).

Torch pickles are read with ``weights_only=True`` only. Loading checks every key and shape
and raises :class:`~vlpipe.errors.InputError` naming the file and what does not fit.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from vlpipe.errors import InputError
from vlpipe.io import read_json

StateDict = dict[str, torch.Tensor]

TIED_KEY = "cls.predictions.decoder.weight"
TIED_SOURCE = "lxmert.embeddings.word_embeddings.weight"
ANSWER_LAYER = "answer_head.logit_fc.3."  # the last Linear (2H -> num_answers) of the QA head
# Buffers some HF/BERT files carry that are not parameters of our modules.
IGNORED_SUFFIXES = (".position_ids",)
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_LISTED = 8


# ------------------------------------------------------------------------- reading


def _load_file(path: Path) -> StateDict:
    """One weights file: safetensors, or a torch pickle read with ``weights_only=True``."""
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Also what weights_only=True raises for pickled code: never fall back to a full unpickle.
        text, marker = str(e), "WeightsUnpickler error:"
        why = text[text.find(marker) + len(marker) :].strip().split("\n")[0] if marker in text else ""
        why = why.split(" Please use")[0] or "corrupt file or not a torch checkpoint"
        raise InputError(path, f"not a readable checkpoint (loaded with weights_only=True: {why})") from e
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(path, f"not a readable checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "expected a state dict (a mapping of parameter names to tensors)")
    return dict(obj)


def _load_sharded(index: Path) -> StateDict:
    """A sharded HF checkpoint: ``*.index.json`` maps every key to its shard file."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(index, "no 'weight_map' mapping in the shard index")
    state: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_file(index.parent / shard))
    return state


def read_checkpoint(path: str | Path) -> StateDict:
    """Read the raw state dict of a file (``.pth``/``.bin``/``.safetensors``) or an HF directory."""
    path = Path(path)
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return _load_sharded(path / name) if name.endswith(".index.json") else _load_file(path / name)
        raise InputError(path, f"no weights file in directory (looked for {', '.join(HF_WEIGHT_FILES)})")
    return _load_file(path)


# ---------------------------------------------------------------------- converting


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``lxrt_pretrain`` (model_LXRT.pth), ``lxrt_finetuned`` (BEST.pth) or ``ours`` (HF names)."""
    keys = list(state)
    if any(k.startswith("module.bert.") for k in keys):
        return "lxrt_pretrain"
    if any(k.startswith("lxrt_encoder.") for k in keys):
        return "lxrt_finetuned"
    return "ours"


def _rename(key: str, rules: Sequence[tuple[str, str]]) -> str | None:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _apply_rules(state: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]], path: Path) -> StateDict:
    """Rename by the first matching prefix rule; keys no rule matches are an error."""
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        new = _rename(key, rules)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise InputError(path, f"unexpected keys for this checkpoint layout: {_listing(unknown)}")
    return out


def convert_lxrt_pretrain(state: Mapping[str, torch.Tensor], path: str | Path = "<state>") -> StateDict:
    """``model_LXRT.pth`` -> ours: drop ``module.``, ``bert.`` -> ``lxmert.``; heads keep their names."""
    rules = [
        ("module.bert.", "lxmert."),
        ("module.cls.", "cls."),
        ("module.obj_predict_head.", "obj_predict_head."),
        ("module.answer_head.", "answer_head."),
    ]
    return _apply_rules(state, rules, Path(path))


def convert_lxrt_finetuned(
    state: Mapping[str, torch.Tensor], path: str | Path = "<state>", head_prefix: str = "answer_head.logit_fc."
) -> StateDict:
    """Fine-tuned ``BEST.pth`` -> ours: the encoder to ``lxmert.``, ``logit_fc.`` to ``head_prefix``.

    VQA/GQA heads have LXMERT's answer-head shape, so the default puts them in ``answer_head``;
    a task model with another head module passes its own prefix (e.g. NLVR2's classifier).
    """
    rules = [
        ("lxrt_encoder.model.module.bert.", "lxmert."),
        ("lxrt_encoder.model.bert.", "lxmert."),
        ("logit_fc.", head_prefix),
    ]
    return _apply_rules(state, rules, Path(path))


def to_our_layout(state: Mapping[str, torch.Tensor], path: str | Path = "<state>") -> StateDict:
    """Convert any of the three layouts (auto-detected) to ours."""
    layout = detect_layout(state)
    if layout == "lxrt_pretrain":
        return convert_lxrt_pretrain(state, path)
    if layout == "lxrt_finetuned":
        return convert_lxrt_finetuned(state, path)
    return {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}


# ------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadReport:
    """What a load did: keys loaded, and model keys left at their init (allowed by the caller)."""

    loaded: int
    missing: tuple[str, ...]
    ignored: tuple[str, ...]


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    more = len(keys) - MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def _starts(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def load_state_dict_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> LoadReport:
    """Load a state dict in our layout into ``model``, checking every key and shape.

    ``allow_missing``: prefixes of model keys the file may lack (they keep their init, e.g.
    ``answer_head.`` when the answer table changed); ``allow_unexpected``: prefixes of file keys
    the model may lack (e.g. ``obj_predict_head.`` when fine-tuning). Anything else that does not
    fit raises :class:`InputError` naming the file, the missing / unexpected keys and the shapes.
    """
    path = Path(path)
    state = dict(state)
    if TIED_KEY not in state and TIED_SOURCE in state:
        state[TIED_KEY] = state[TIED_SOURCE]  # the tied MLM decoder is stored once
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shapes = [
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if not_allowed := [k for k in missing if not _starts(k, allow_missing)]:
        problems.append(f"{len(not_allowed)} missing keys: {_listing(not_allowed)}")
    if not_allowed := [k for k in unexpected if not _starts(k, allow_unexpected)]:
        problems.append(f"{len(not_allowed)} unexpected keys: {_listing(not_allowed)}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatches: {_listing(bad_shapes)}")
    if problems:
        raise InputError(path, "checkpoint does not fit the model: " + "; ".join(problems))
    fitting = {k: state[k] for k in expected if k in state}
    model.load_state_dict(fitting, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return LoadReport(loaded=len(fitting), missing=tuple(missing), ignored=tuple(unexpected))


def load_reference_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> LoadReport:
    """Read ``model_LXRT.pth`` / ``BEST.pth`` / an HF directory, convert it and load it."""
    state = to_our_layout(read_checkpoint(path), path)
    return load_state_dict_into(
        model, state, path, allow_missing=allow_missing, allow_unexpected=allow_unexpected
    )


# ------------------------------------------------------------------ answer tables


def _as_list(label2ans: Sequence[str] | Mapping[int, str]) -> list[str]:
    if isinstance(label2ans, Mapping):
        return [label2ans[i] for i in range(len(label2ans))]
    return list(label2ans)


def transfer_answer_head(
    state: Mapping[str, torch.Tensor],
    old_label2ans: Sequence[str] | Mapping[int, str],
    new_label2ans: Sequence[str] | Mapping[int, str],
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    normalize: Callable[[str], str] | None = None,
    prefix: str = ANSWER_LAYER,
) -> tuple[StateDict, int]:
    """Re-index the last QA layer from one answer table to another (LXMERT's ``load_lxmert_qa``).

    Rows of answers present in both tables are copied; the others come from ``init`` (the
    target model's fresh state dict, same key names) or are zero. ``normalize`` maps answers
    to a common form before matching (e.g. the data package's answer normalisation).
    Returns (new state dict, number of answers copied).
    """
    w_key, b_key = prefix + "weight", prefix + "bias"
    if w_key not in state or b_key not in state:
        raise KeyError(f"no answer layer {prefix}{{weight,bias}} in the state dict")
    norm = normalize or (lambda a: a)
    old = {norm(a): i for i, a in enumerate(_as_list(old_label2ans))}
    new = _as_list(new_label2ans)
    weight, bias = state[w_key], state[b_key]  # (A_old, 2H), (A_old,)
    if init is not None:
        new_w, new_b = init[w_key].clone(), init[b_key].clone()  # (A_new, 2H), (A_new,)
    else:
        new_w, new_b = weight.new_zeros(len(new), weight.shape[1]), bias.new_zeros(len(new))
    if new_w.shape != (len(new), weight.shape[1]):
        raise ValueError(f"init {w_key} has shape {tuple(new_w.shape)}, expected {(len(new), weight.shape[1])}")
    pairs = [(j, old[norm(a)]) for j, a in enumerate(new) if norm(a) in old]
    if pairs:
        rows_new = torch.tensor([j for j, _ in pairs])
        rows_old = torch.tensor([i for _, i in pairs])
        new_w[rows_new] = weight[rows_old]
        new_b[rows_new] = bias[rows_old]
    out = dict(state)
    out[w_key], out[b_key] = new_w, new_b
    return out, len(pairs)


# ------------------------------------------------------------------- import to HF layout


def _count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_lxmert_config(state: Mapping[str, torch.Tensor], num_attention_heads: int | None = None, path: str | Path = "<state>"):
    """An ``LxmertConfig`` read off a state dict in our layout (sizes from the tensor shapes).

    The number of heads is not visible in the weights: by default hidden/64, as BERT-base and
    LXMERT (768 -> 12). Pre-training task switches follow the heads present in the file.
    """
    from transformers import LxmertConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise InputError(path, f"not an LXMERT checkpoint: no {key}")
        return tuple(state[key].shape)

    vocab, hidden = shape("lxmert.embeddings.word_embeddings.weight")
    heads = num_attention_heads or max(hidden // 64, 1)
    if hidden % heads:
        raise InputError(path, f"hidden size {hidden} is not a multiple of {heads} attention heads")
    decoders = {k.split(".")[2] for k in state if k.startswith("obj_predict_head.decoder_dict.")}

    def labels(name: str) -> int:
        key = f"obj_predict_head.decoder_dict.{name}.weight"
        return shape(key)[0] if key in state else 1

    has_qa = f"{ANSWER_LAYER}weight" in state
    return LxmertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=shape("lxmert.encoder.layer.0.intermediate.dense.weight")[0],
        l_layers=_count_layers(state, "lxmert.encoder.layer."),
        x_layers=_count_layers(state, "lxmert.encoder.x_layers."),
        r_layers=_count_layers(state, "lxmert.encoder.r_layers."),
        max_position_embeddings=shape("lxmert.embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("lxmert.embeddings.token_type_embeddings.weight")[0],
        visual_feat_dim=shape("lxmert.encoder.visn_fc.visn_fc.weight")[1],
        visual_pos_dim=shape("lxmert.encoder.visn_fc.box_fc.weight")[1],
        num_object_labels=labels("obj"),
        num_attr_labels=labels("attr"),
        num_qa_labels=shape(f"{ANSWER_LAYER}weight")[0] if has_qa else 1,
        task_mask_lm=True,
        task_matched=True,
        task_obj_predict=bool(decoders),
        task_qa=has_qa,
        visual_obj_loss="obj" in decoders,
        visual_attr_loss="attr" in decoders,
        visual_feat_loss="feat" in decoders,
    )


def import_lxmert(path: str | Path, out_dir: str | Path, num_attention_heads: int | None = None) -> dict:
    """Convert a reference pre-training checkpoint (``model_LXRT.pth`` or an HF directory) into
    our HF ``save_pretrained`` layout at ``out_dir``; every key and shape is checked."""
    from vlpipe.models.lxmert import Lxmert, save_lxmert

    state = to_our_layout(read_checkpoint(path), path)
    if TIED_KEY not in state and TIED_SOURCE in state:
        state[TIED_KEY] = state[TIED_SOURCE]
    config = infer_lxmert_config(state, num_attention_heads, path)
    model = Lxmert(config)
    report = load_state_dict_into(model, state, path)
    save_lxmert(model, out_dir)
    return {"loaded": report.loaded, "hidden": config.hidden_size, "layers": (config.l_layers, config.x_layers, config.r_layers)}
