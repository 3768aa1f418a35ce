"""Stages `pretrain@xvlm`, `finetune@xvlm-<task>` and `submit@xvlm-<task>` (X-VLM, Zeng et al. 2022).

Pre-training reads params ``pretrain.xvlm``; fine-tuning and submission read
``finetune.xvlm-<task>`` (task: retrieval, refcoco, vqa, nlvr2). X-VLM sees pixels, so the
only upstream stages are ``world`` (images and text) and ``tokenizer`` (vocabulary).

Each ``run_*`` reads params.yaml and calls the function of the same name without ``run_``
(``pretrain``, ``finetune``, ``submit``), which takes the validated params object instead.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from vlpipe.config import XvlmFinetuneParams, XvlmModelParams, XvlmPretrainParams, load_section
from vlpipe.data.examples import Example, ExampleDataset
from vlpipe.data.formats.refcoco import box_to_cxcywh, read_refcoco
from vlpipe.data.images import image_to_tensor, read_image
from vlpipe.data.tokenizer import load_tokenizer
from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, read_json, write_json, write_metrics

WORLD = Path("data/world")
TOKENIZER = Path("data/tokenizer")
PRETRAINED = Path("models/pretrained")
FINETUNED = Path("models/finetuned")
LEADERBOARD = Path("leaderboard")
RUNS = Path("runs")  # persistent checkpoints (DVC `persist: true`) so a killed stage resumes
LIVE = Path("dvclive")
MODEL = "xvlm"
# NLVR2 options that change how a trained model reads its pairs: task.json records them, and
# submit refuses params that say otherwise (the model would read inputs it was not trained on)
READING_OPTIONS = ("own_frame", "own_clause_first", "symmetric_head")


# ------------------------------------------------------------------ visual source


class PixelInputs:
    """Pixels of the world's images for a batch of img_ids: ``{"pixel_values": (B, 3, S, S)}``.

    Images are read from ``root / pattern`` (``images/{img_id}.png`` in the world), resized to
    ``image_size`` when needed and normalised like the detector's input (BGR, about [-1, 1]).
    Decoded images are kept in memory (the world's 4000 64x64 images take 50 MB).
    """

    kind = "pixels"

    def __init__(self, root: str | Path, image_size: int, pattern: str = "images/{img_id}.png"):
        self.root = Path(root)
        self.image_size = image_size
        self.pattern = pattern
        self._cache: dict[str, torch.Tensor] = {}

    def _load(self, img_id: str) -> torch.Tensor:
        img = read_image(self.root / self.pattern.format(img_id=img_id))  # (H, W, 3) uint8 BGR
        if img.shape[:2] != (self.image_size, self.image_size):
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        return image_to_tensor(np.ascontiguousarray(img))  # (3, S, S)

    def __call__(self, img_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        for img_id in img_ids:
            if img_id not in self._cache:
                self._cache[img_id] = self._load(img_id)
        return {"pixel_values": torch.stack([self._cache[i] for i in img_ids])}


# ------------------------------------------------------------- pre-training data


Region = tuple[str | None, tuple[float, float, float, float]]  # phrase, normalised (cx, cy, w, h)
WHOLE_IMAGE: Region = (None, (0.5, 0.5, 1.0, 1.0))  # phrase None: the example's own caption


def scene_regions(world_dir: Path, split: str) -> dict[str, list[Region]]:
    """Objects of the split's scene graphs as ``the <size> <color> <shape>`` with their boxes;
    only phrases that name one object of the scene (a repeated object has no single box)."""
    path = world_dir / "scenes" / f"{split}.json"
    scenes = read_json(path)
    if not isinstance(scenes, list):
        raise InputError(path, "expected a list of scene graphs")
    out: dict[str, list[Region]] = {}
    for n, scene in enumerate(scenes):
        try:
            w, h = scene["width"], scene["height"]
            named = [(f"the {o['size']} {o['color']} {o['shape']}", o["bbox"]) for o in scene["objects"]]
        except (KeyError, TypeError) as e:
            raise InputError(path, f"scene {n}: malformed ({type(e).__name__}: {e})") from e
        phrases = [phrase for phrase, _ in named]
        out[scene["img_id"]] = [(ph, box_to_cxcywh(box, w, h)) for ph, box in named if phrases.count(ph) == 1]
    return out


def refcoco_regions(world_dir: Path, split: str) -> dict[str, list[Region]]:
    """The split's referring expressions with their boxes, by img_id."""
    out: dict[str, list[Region]] = {}
    sizes: dict[str, tuple[int, int]] = {}  # (h, w) per image, read once
    for r in read_refcoco(world_dir / "refcoco" / f"{split}.json", labelled=True):
        if r["image"] not in sizes:
            sizes[r["image"]] = read_image(world_dir / r["image"]).shape[:2]
        h, w = sizes[r["image"]]
        out.setdefault(Path(r["image"]).stem, []).append((r["text"], box_to_cxcywh(r["bbox"], w, h)))
    return out


def split_captions(world_dir: Path, split: str) -> list[tuple[str, str]]:
    """(img_id, caption) of every caption of the split's retrieval file, in file order."""
    from vlpipe.tasks.retrieval import RetrievalSplit, train_examples

    if split == "train":
        return [(ex.img_ids[0], ex.sent) for ex in train_examples(world_dir / "retrieval" / "train.json")]
    rs = RetrievalSplit.read(world_dir / "retrieval" / f"{split}.json")
    return [(rs.images[i], t) for t, i in zip(rs.texts, rs.txt2img, strict=True)]


def pretrain_examples(world_dir: Path, split: str, sources: Sequence[str]) -> list[Example]:
    """One example per caption of the split's retrieval file, with every region of its image.

    ``target`` numbers the image (ITC positives); ``info["regions"]`` holds (phrase, box,
    region number) triples, region numbers unique over the split. An image without any region
    phrase gets the whole image, described by the caption itself.
    """
    captions = split_captions(world_dir, split)
    regions: dict[str, list[Region]] = {}
    readers = {"scenes": scene_regions, "refcoco": refcoco_regions}
    for source in sources:
        for img, items in readers[source](world_dir, split).items():
            regions.setdefault(img, []).extend(items)
    images = sorted({img for img, _ in captions})
    index = {img: i for i, img in enumerate(images)}
    numbered: dict[str, tuple] = {}
    count = 0
    for img in images:
        items = regions.get(img) or [WHOLE_IMAGE]
        numbered[img] = tuple((phrase, box, count + j) for j, (phrase, box) in enumerate(items))
        count += len(numbered[img])
    return [
        Example(key=n, img_ids=(img,), sent=sent, target=index[img], info={"regions": numbered[img]})
        for n, (img, sent) in enumerate(captions)
    ]


def make_xvlm_collate(
    tokenizer: Any,
    visual: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    max_length: int,
    *,
    regions: bool,
    generator: torch.Generator | None = None,
) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """Batches for :meth:`Xvlm.forward`: pixels, captions (padded to the longest), image ids
    and, with ``regions``, one region phrase per example drawn at random (torch RNG, or
    ``generator``) from its image's regions. Masking happens in the loss function."""

    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        text = tokenizer([ex.sent for ex in batch], padding="longest", truncation=True, max_length=max_length,
                         return_tensors="pt")  # fmt: skip
        out = {
            "pixel_values": visual([ex.img_ids[0] for ex in batch])["pixel_values"],  # (B, 3, S, S)
            "input_ids": text["input_ids"],  # (B, L)
            "attention_mask": text["attention_mask"],
            "image_ids": torch.tensor([ex.target for ex in batch], dtype=torch.long),  # (B,)
        }
        if regions:
            picked = []
            for ex in batch:
                options = ex.info["regions"]
                picked.append(options[int(torch.randint(len(options), (1,), generator=generator))])
            texts = [r[0] if r[0] is not None else ex.sent for r, ex in zip(picked, batch, strict=True)]
            phrases = tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                                return_tensors="pt")  # fmt: skip
            out["region_input_ids"] = phrases["input_ids"]  # (B, Lr)
            out["region_attention_mask"] = phrases["attention_mask"]
            out["region_boxes"] = torch.tensor([r[1] for r in picked], dtype=torch.float32)  # (B, 4)
            out["region_ids"] = torch.tensor([r[2] for r in picked], dtype=torch.long)  # (B,)
        return out

    return collate


# ------------------------------------------------------------------ pre-training


def _clear_checkpoints(root: Path, name: str) -> None:
    """A finished run's checkpoints exist only to resume a killed stage: a later re-run must start fresh."""
    shutil.rmtree(root / RUNS / name / "checkpoints", ignore_errors=True)



def _inside(model: XvlmModelParams, root: Path) -> XvlmModelParams:
    """Relative ``vision_init`` / ``text_init`` paths are relative to the repository root."""
    paths = {k: str(root / v) for k in ("vision_init", "text_init") if (v := getattr(model, k)) and not Path(v).is_absolute()}
    return model.model_copy(update=paths)


def run_pretrain(params_path: Path, root: Path) -> None:
    """Stage ``pretrain@xvlm``."""
    pretrain(load_section("pretrain", params_path).xvlm, root)


def pretrain(p: XvlmPretrainParams, root: Path) -> dict[str, Any]:
    """Pre-train X-VLM on the world's training captions and region phrases; write
    ``models/pretrained/xvlm`` and ``metrics/pretrain/xvlm.json`` (returned)."""
    from vlpipe.models.xvlm import WholeWordMasker, build_xvlm, count_parameters, write_xvlm_files
    from vlpipe.train.loop import fit, seed_everything

    world = root / WORLD
    tok = load_tokenizer(root / TOKENIZER)
    visual = PixelInputs(world, p.model.image_size)
    train_ex = pretrain_examples(world, "train", p.region_sources)
    val_ex = pretrain_examples(world, "val", p.region_sources)
    seed_everything(p.train.seed)
    model = build_xvlm(_inside(p.model, root), vocab_size=len(tok))
    collate = make_xvlm_collate(tok, visual, p.model.max_text_length, regions=True)
    masker = WholeWordMasker.for_tokenizer(tok, p.model)

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return m(**masker(batch)).losses

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return pretrain_val_metrics(m, val_ex, tok, visual, masker, p)

    fingerprint = json.dumps({"model": p.model.model_dump(mode="json"), "sources": p.region_sources})
    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, p.train, root / RUNS / "pretrain-xvlm",
        eval_fn=eval_fn, live_dir=root / LIVE / "pretrain-xvlm", fingerprint=fingerprint,
    )  # fmt: skip
    with atomic_dir(root / PRETRAINED / MODEL) as tmp:
        write_xvlm_files(result.model, tmp)
        write_json(tmp / "meta.json", {"model": MODEL, "visual_input": "pixels", "image_size": p.model.image_size})
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step,
               "train_examples": len(train_ex), "parameters": count_parameters(result.model),
               "samples_per_second": result.samples_per_second, "train_seconds": result.train_seconds}  # fmt: skip
    write_metrics(root / "metrics/pretrain/xvlm.json", metrics)
    _clear_checkpoints(root, "pretrain-xvlm")
    return metrics


@torch.no_grad()
def pretrain_val_metrics(
    model: Any, examples: list[Example], tokenizer: Any, visual: PixelInputs, masker: Any, p: XvlmPretrainParams
) -> dict[str, float]:
    """Zero-shot ITC retrieval recalls on val (no re-ranking) and each pre-training loss on a
    fixed sample of val examples (regions and masks drawn from a fixed generator)."""
    from vlpipe.eval.retrieval import retrieval_metrics
    from vlpipe.tasks.retrieval import RetrievalSplit, rank_split

    split = RetrievalSplit.read(visual.root / "retrieval" / "val.json", max_images=p.val_max_images)
    scores = rank_split(model, split, visual, tokenizer, max_length=p.model.max_text_length,
                        batch_size=p.eval_batch_size, k=0)  # fmt: skip
    metrics = {f"itc_{k}": v for k, v in retrieval_metrics(scores["itc_i2t"], scores["itc_t2i"], split.txt2img).items()}
    gen = torch.Generator().manual_seed(1234)
    collate = make_xvlm_collate(tokenizer, visual, p.model.max_text_length, regions=True, generator=gen)
    first = {}  # one caption per image keeps the loss pass as cheap as the ranking
    for ex in examples:
        first.setdefault(ex.img_ids[0], ex)
    sample = [first[img] for img in split.images if img in first]
    sums: dict[str, float] = {}
    n = 0
    for start in range(0, len(sample), p.eval_batch_size):
        batch = masker(collate(sample[start : start + p.eval_batch_size]), generator=gen)
        for k, v in model(**batch, generator=gen).losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return metrics | {f"loss_{k}": v / max(n, 1) for k, v in sums.items()}


# ------------------------------------------------------------------ fine-tuning

FINETUNE_TASKS: dict[str, dict[str, bool]] = {
    # heads each fine-tuning keeps (X-VLM: retrieval = ITC + ITM; refcoco keeps the box head)
    "retrieval": {"itc": True, "itm": True, "mlm": False, "bbox": False, "region": False},
    "refcoco": {"itc": False, "itm": False, "mlm": False, "bbox": True, "region": False},
    "vqa": {"itc": False, "itm": False, "mlm": False, "bbox": False, "region": False},
    "nlvr2": {"itc": False, "itm": False, "mlm": False, "bbox": False, "region": False},
}


def _finetune_params(key: str, params_path: Path) -> XvlmFinetuneParams:
    section = load_section("finetune", params_path)
    if key not in section:
        raise InputError(params_path, f"no finetune entry {key!r} (have: {', '.join(sorted(section))})")
    return section[key]


def load_for_finetuning(p: XvlmFinetuneParams, root: Path) -> Any:
    """The pre-trained X-VLM (or the same architecture with fresh weights for ``scratch``, or
    a local directory of ours), keeping only the heads the task uses."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint
    from vlpipe.models.xvlm import TIED_KEY, Xvlm, load_xvlm_config
    from vlpipe.train.loop import seed_everything

    source = root / p.start_from if p.init in ("pretrained", "scratch") else Path(p.init)
    config = load_xvlm_config(source)
    config.tasks = FINETUNE_TASKS[p.task]
    if p.pair_fusion != "concat":  # read by XvlmEncoder, kept in the task model's config.json
        config.pair_fusion = p.pair_fusion
    seed_everything(p.train.seed)
    model = Xvlm(config)
    if p.init != "scratch":
        state = {k: v for k, v in read_checkpoint(source / "model.safetensors").items() if k != TIED_KEY}
        fresh: tuple[str, ...] = ()
        if any(k.startswith("encoder.") for k in state):
            # A task model of ours (start_from another fine-tuning): its image and text
            # encoders; the heads this task needs start fresh, the source's own head is dropped.
            state = {k.removeprefix("encoder."): v for k, v in state.items()
                     if k.startswith(("encoder.vision.", "encoder.bert."))}  # fmt: skip
            fresh = ("itm_head.", "bbox_head.", "vision_proj.", "text_proj.", "temp")
        load_state_dict_into(model, state, source, allow_missing=fresh,
                             allow_unexpected=("mlm_head.", "bbox_head.", "itm_head."))  # fmt: skip
    if p.mark_sides and p.init != "scratch":
        # Pre-training and VQA feed token type 0 only, so type 1 is still its random init: start
        # it as type 0, so the right image's row reads the sentence as the VQA model did and the
        # fine-tuning learns only the difference between the sides.
        with torch.no_grad():
            types = model.bert.embeddings.token_type_embeddings.weight  # (type_vocab_size, H)
            types[1:] = types[0]
    if p.freeze_vision:
        # A fixed feature extractor, as LXMERT's detector is (its ViT has no dropout and its
        # stem GroupNorm no running statistics, so train mode computes the same features).
        model.vision.requires_grad_(False)
    return model


def vision_lr_scales(p: XvlmFinetuneParams, prefix: str) -> dict[str, float] | None:
    """``fit``'s ``lr_scales`` for the image encoder (parameter names under ``prefix``), or None
    when it trains at the base rate or is frozen."""
    if p.freeze_vision or p.vision_lr_scale == 1.0:
        return None
    return {prefix: p.vision_lr_scale}


def encoder_lr_scales(p: XvlmFinetuneParams, root: str) -> dict[str, float] | None:
    """``fit``'s ``lr_scales`` for a task model whose X-VLM parts sit under ``root`` (``"encoder."``
    for a task model, ``""`` for retrieval's bare X-VLM): the image encoder at ``vision_lr_scale``,
    everything else of the encoder (text + fusion layers, NLVR2's image slots) at
    ``encoder_lr_scale``; the task head at the base rate. None when every rate is the base one.
    The image encoder comes first: ``param_groups`` takes the first prefix a name matches."""
    scales = vision_lr_scales(p, f"{root}vision.") or {}
    if p.encoder_lr_scale == 1.0:
        return scales or None
    if not root:  # retrieval trains X-VLM itself: its text side is ``bert.``, its heads stay at the base rate
        return {**scales, "bert.": p.encoder_lr_scale}
    return {**scales, f"{root}vision.": scales.get(f"{root}vision.", 1.0), root: p.encoder_lr_scale}


def make_pixel_collate(
    task: Any, tokenizer: Any, visual: Callable[[Sequence[str]], dict[str, torch.Tensor]], max_length: int,
    with_targets: bool = True, mark_sides: bool = False, own_frame: bool = False, own_clause_first: bool = False,
) -> Callable[[list[Example]], dict[str, Any]]:  # fmt: skip
    """Like :func:`vlpipe.tasks.base.make_collate` with pixels as the visual input: each example
    gives ``task.num_images`` rows (its sentence with each of its images), texts padded to the
    longest in the batch. ``mark_sides``: each row's token type is the index of its own image
    (NLVR2: row 0 reads the left image as its own, row 1 the right one). ``own_frame`` (NLVR2):
    the right image's row reads the sentence with "left" / "right" swapped, so that in every
    row "the left image" is the row's own image. ``own_clause_first`` (with ``own_frame``): a row
    whose sentence joins a clause about each image reads its own image's clause first
    (:func:`left_clause_first`)."""
    if own_frame and task.num_images != 2:
        raise ValueError(f"own_frame is for two-image tasks (NLVR2), not {task.name!r}")
    if own_clause_first and not own_frame:
        raise ValueError("own_clause_first orders the clauses of own_frame's rows: it needs own_frame")
    from vlpipe.tasks.nlvr2 import swap_side_words

    def collate(batch: list[Example]) -> dict[str, Any]:
        sents = [ex.sent for ex in batch for _ in ex.img_ids]
        if own_frame:  # rows are (example, image) pairs: odd rows read the right image
            sents = [swap_side_words(s) if k % 2 else s for k, s in enumerate(sents)]
        if own_clause_first:  # every row, mirrored pairs' first rows included
            sents = [left_clause_first(s) for s in sents]
        text = tokenizer(sents, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        types = text["token_type_ids"]  # (B * n, L), zeros
        if mark_sides:  # as make_collate's: rows are (example, image) pairs, row k reads image k % n
            side = torch.arange(len(sents)) % task.num_images  # (B * n,)
            types = side[:, None].expand_as(types).contiguous()
        inputs = {
            "input_ids": text["input_ids"],  # (B * n, L)
            "attention_mask": text["attention_mask"],
            "token_type_ids": types,
            **visual([i for ex in batch for i in ex.img_ids]),  # pixel_values (B * n, 3, S, S)
        }
        out: dict[str, Any] = {"inputs": inputs, "examples": batch}
        if with_targets:
            out["targets"] = task.targets(batch)
        return out

    return collate


# "the right image <clause> and|or the left image <clause>": two clauses, one about each image
_RIGHT_THEN_LEFT = re.compile(r"^([Tt])he right image (.+?) (and|or) the left image (.+?)([.!]?)$")


def left_clause_first(sentence: str) -> str:
    """``sentence`` with its clause about the left image first, where it joins one clause about
    each image by "and" / "or": "The right image contains A or the left image contains B." ->
    "The left image contains B or the right image contains A." Both connectives commute, so the
    claim is the same; other sentences come back unchanged. With ``own_frame`` (where "the left
    image" is the row's own image) every row then meets its own clause first, where the VQA model
    it starts from reads a statement's subject."""
    m = _RIGHT_THEN_LEFT.match(sentence)
    if m is None:
        return sentence
    cap, right, conn, left, end = m.groups()
    return f"{cap}he left image {left} {conn} the right image {right}{end}"


def with_flips(collate: Callable[[list[Example]], dict[str, Any]]) -> Callable[[list[Example]], dict[str, Any]]:
    """``collate`` with each row's image mirrored left-right with probability 1/2, independently
    (``flip_images``). The coin comes from the global torch RNG, which checkpoints capture, so a
    resumed run flips the same images."""

    def flipped(batch: list[Example]) -> dict[str, Any]:
        out = collate(batch)
        px = out["inputs"]["pixel_values"]  # (B * n, 3, S, S)
        coin = torch.rand(px.shape[0]) < 0.5  # (B * n,)
        out["inputs"]["pixel_values"] = torch.where(coin[:, None, None, None], px.flip(-1), px)
        return out

    return flipped


def make_task(name: str, world_dir: Path) -> Any:
    """The task object of ``name``: the shared VQA / NLVR2 tasks or grounding."""
    from vlpipe.tasks import TASKS
    from vlpipe.tasks.refcoco import RefcocoTask

    return RefcocoTask(world_dir) if name == "refcoco" else TASKS[name](world_dir)


def run_finetune(key: str, params_path: Path, root: Path) -> None:
    """Stage ``finetune@xvlm-<task>``."""
    finetune(key, _finetune_params(key, params_path), root)


def finetune(key: str, p: XvlmFinetuneParams, root: Path) -> dict[str, Any]:
    """Fine-tune on ``p.task``; write ``models/finetuned/<key>`` and ``metrics/finetune/<key>.json``."""
    if p.task == "retrieval":
        return finetune_retrieval(key, p, root)
    return finetune_task(key, p, root)


def _retrieval_eval(tok: Any, visual: PixelInputs, max_length: int, p: XvlmFinetuneParams, split_name: str,
                    root: Path) -> tuple[Any, Callable]:  # fmt: skip
    from vlpipe.tasks.retrieval import RetrievalSplit, rank_split, split_metrics

    split = RetrievalSplit.read(root / WORLD / "retrieval" / f"{split_name}.json")

    def evaluate(m: torch.nn.Module, step: int) -> dict[str, float]:
        scores = rank_split(m, split, visual, tok, max_length=max_length, batch_size=p.eval_batch_size, k=p.k_test)
        return split_metrics(scores, split)

    return split, evaluate


def finetune_retrieval(key: str, p: XvlmFinetuneParams, root: Path) -> dict[str, Any]:
    """ITC + ITM (hard negatives) on the training captions; val recalls after ITM re-ranking."""
    from vlpipe.models.xvlm import write_xvlm_files
    from vlpipe.tasks.retrieval import train_examples
    from vlpipe.train.loop import fit

    tok = load_tokenizer(root / TOKENIZER)
    model = load_for_finetuning(p, root)
    visual = PixelInputs(root / WORLD, model.vision.image_size)
    max_length = int(model.config.max_text_length)
    train_ex = train_examples(root / WORLD / "retrieval" / "train.json")
    collate = make_xvlm_collate(tok, visual, max_length, regions=False)
    _, eval_fn = _retrieval_eval(tok, visual, max_length, p, "val", root)

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return m(**batch).losses

    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, p.train, root / RUNS / f"finetune-{key}",
        eval_fn=eval_fn, live_dir=root / LIVE / f"finetune-{key}", fingerprint=json.dumps({"key": key, "init": p.init, "start_from": p.start_from, "swap_sides": p.swap_sides, "freeze_vision": p.freeze_vision,
        **({"encoder_lr_scale": p.encoder_lr_scale} if p.encoder_lr_scale != 1.0 else {})}),
        lr_scales=encoder_lr_scales(p, ""), ema_decay=p.ema_decay,
    )  # fmt: skip
    with atomic_dir(root / FINETUNED / key) as tmp:
        write_xvlm_files(result.model, tmp)
        write_json(tmp / "task.json", {"model": MODEL, "task": p.task, "num_images": 1})
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step, "init": p.init,
               "samples_per_second": result.samples_per_second, "train_seconds": result.train_seconds}  # fmt: skip
    write_metrics(root / f"metrics/finetune/{key}.json", metrics)
    _clear_checkpoints(root, f"finetune-{key}")
    return metrics


def finetune_task(key: str, p: XvlmFinetuneParams, root: Path) -> dict[str, Any]:
    """VQA or NLVR2: an :class:`XvlmEncoder` + the task's head in a ``TaskModel``; grounding:
    an :class:`XvlmGrounder` with the pre-trained box head."""
    from vlpipe.models.xvlm import XvlmEncoder, XvlmGrounder
    from vlpipe.tasks.base import predict_all
    from vlpipe.train.loop import fit

    task = make_task(p.task, root / WORLD)
    tok = load_tokenizer(root / TOKENIZER)
    pre = load_for_finetuning(p, root)
    encoder = XvlmEncoder(pre, task.num_images)
    if p.vision_cache_mb:  # freeze_vision: each image is encoded once
        encoder.cache_frozen_vision(p.vision_cache_mb * 2**20)
    visual = PixelInputs(root / WORLD, pre.vision.image_size)
    domain: dict[str, Any] | None = None
    if p.text_assignment is not None:
        domain = text_assignment(key, p, encoder, tok, visual, root)
    if p.task == "refcoco":
        model = XvlmGrounder(encoder, pre.bbox_head)  # X-VLM fine-tunes the pre-trained box head
    else:
        model = nlvr2_or_task_model(p, task, encoder, root)
    collate = make_pixel_collate(task, tok, visual, encoder.max_text_length, mark_sides=p.mark_sides,
                                 own_frame=p.own_frame, own_clause_first=p.own_clause_first)  # fmt: skip
    train_ex, val_ex = task.examples("train"), task.examples("val")
    if p.swap_sides:
        from vlpipe.tasks.nlvr2 import swap_sides

        train_ex += swap_sides(train_ex)

    train_data: Any = ExampleDataset(train_ex)
    collate_nlvr2 = with_flips(collate) if p.flip_images else collate
    if p.vqa_per_pair:  # NLVR2 multi-tasked with VQA: each pair brings its VQA questions
        from vlpipe.models.xvlm import Nlvr2WithVqa

        vqa = make_task("vqa", root / WORLD)
        train_data = WithPartners(train_ex, vqa.examples("train"), p.vqa_per_pair, p.train.seed)
        collate_train = with_partners_collate(collate_nlvr2, make_pixel_collate(vqa, tok, visual, encoder.max_text_length))
        model = Nlvr2WithVqa(model)
    else:
        collate_train = collate_nlvr2

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "vqa_inputs" not in batch:
            return task.loss(m(batch["inputs"]), batch["targets"])
        logits, vqa_logits = m(batch["inputs"], batch["vqa_inputs"])  # (B, 2), (Q, A)
        main, aux = task.loss(logits, batch["targets"]), vqa.loss(vqa_logits, batch["vqa_targets"])
        return {**main, **aux, "loss": main["loss"] + aux["loss"]}

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        m = m.nlvr2 if p.vqa_per_pair else m
        return _flat(task.metric(predict_all(m, task, val_ex, collate, p.eval_batch_size), "val"))

    result = fit(
        model, loss_fn, train_data, collate_train, p.train, root / RUNS / f"finetune-{key}",
        eval_fn=eval_fn, live_dir=root / LIVE / f"finetune-{key}", fingerprint=json.dumps({"key": key, "init": p.init, "start_from": p.start_from, "swap_sides": p.swap_sides, "freeze_vision": p.freeze_vision,
        **({"mark_sides": True} if p.mark_sides else {}),
        **({"own_frame": True} if p.own_frame else {}),
        **({"own_clause_first": True} if p.own_clause_first else {}),
        **({"symmetric_head": True} if p.symmetric_head else {}),
        **({"flip_images": True} if p.flip_images else {}),
        **({"pair_fusion": p.pair_fusion} if p.pair_fusion != "concat" else {}),
        **({"answer_features": True} if p.answer_features else {}),
        **({"vqa_per_pair": p.vqa_per_pair} if p.vqa_per_pair else {}),
        **({"pair_head": p.pair_head, "pair_head_layers": p.pair_head_layers} if p.pair_head != "cls" else {}),
        **({"text_assignment": p.text_assignment.model_dump()} if p.text_assignment is not None else {}),
        **({"encoder_lr_scale": p.encoder_lr_scale} if p.encoder_lr_scale != 1.0 else {})}),
        lr_scales=encoder_lr_scales(p, "nlvr2.encoder." if p.vqa_per_pair else "encoder."), ema_decay=p.ema_decay,
    )  # fmt: skip
    save_task_model(result.model.nlvr2 if p.vqa_per_pair else result.model, p, root / FINETUNED / key)
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step, "init": p.init,
               "samples_per_second": result.samples_per_second, "train_seconds": result.train_seconds}  # fmt: skip
    if encoder.vision_cache is not None:
        c = encoder.vision_cache
        metrics["vision_cache"] = {"images": len(c), "mib": round(c.nbytes / 2**20, 1),
                                   "hit_rate": round(c.hits / max(c.hits + c.misses, 1), 4)}  # fmt: skip
    if domain is not None:  # its wall time goes with the stage's timing, not into the metrics
        metrics["text_assignment_seconds"] = domain.pop("train_seconds")
        metrics["text_assignment"] = domain
    write_metrics(root / f"metrics/finetune/{key}.json", metrics)
    _clear_checkpoints(root, f"finetune-{key}")
    _clear_checkpoints(root, f"finetune-{key}-ta")
    return metrics


class WithPartners(Sequence):
    """Training items ``(examples[i], partners)`` for multi-task fine-tuning: each item brings
    ``per_item`` examples of a second task. Partners are consecutive entries of a seeded
    permutation of ``partners`` (wrapping around), so item ``i`` always brings the same ones
    (resumable, identical on every process) and the items together cover the second task as
    evenly as their count allows."""

    def __init__(self, examples: Sequence[Example], partners: Sequence[Example], per_item: int, seed: int):
        if per_item < 1 or not partners:
            raise ValueError(f"WithPartners needs per_item >= 1 and partners, got {per_item} and {len(partners)}")
        self.examples, self.partners, self.per_item = list(examples), list(partners), per_item
        self.order = torch.randperm(len(partners), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[Example, list[Example]]:  # type: ignore[override]
        n = len(self.order)
        return self.examples[i], [self.partners[self.order[(i * self.per_item + j) % n]] for j in range(self.per_item)]


def with_partners_collate(
    collate: Callable[[list[Example]], dict[str, Any]], partner_collate: Callable[[list[Example]], dict[str, Any]]
) -> Callable[[list[tuple[Example, list[Example]]]], dict[str, Any]]:
    """Collate of :class:`WithPartners` items: the main batch, plus the partners' inputs and
    targets as ``vqa_inputs`` / ``vqa_targets``."""

    def both(batch: list[tuple[Example, list[Example]]]) -> dict[str, Any]:
        out = collate([ex for ex, _ in batch])
        partners = partner_collate([q for _, qs in batch for q in qs])
        return out | {"vqa_inputs": partners["inputs"], "vqa_targets": partners["targets"]}

    return both


def text_assignment(
    key: str, p: XvlmFinetuneParams, encoder: Any, tok: Any, visual: PixelInputs, root: Path
) -> dict[str, Any]:
    """NLVR2 domain pre-training (ALBEF / X-VLM text assignment, :mod:`vlpipe.tasks.text_assignment`)
    of the two-image ``encoder`` in place, for ``p.text_assignment`` settings, on the world's
    retrieval captions; returns its val accuracy and last losses. Its checkpoints live in
    ``runs/finetune-<key>-ta`` (resumed like any run) and its curve in that run's ``live``."""
    from vlpipe.tasks.base import TaskModel, predict_all
    from vlpipe.tasks.text_assignment import TextAssignment, text_assignment_examples
    from vlpipe.train.loop import fit, seed_everything

    assert p.text_assignment is not None
    ta = TextAssignment()
    train_ex = text_assignment_examples(split_captions(root / WORLD, "train"), p.text_assignment.seed)
    val_ex = text_assignment_examples(split_captions(root / WORLD, "val"), p.text_assignment.seed)
    seed_everything(p.text_assignment.seed)
    model = TaskModel(encoder, ta.build_head(encoder.hidden_size), ta.num_images)
    collate = make_pixel_collate(ta, tok, visual, encoder.max_text_length)

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return ta.loss(m(batch["inputs"]), batch["targets"])

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return ta.metric(predict_all(m, ta, val_ex, collate, p.eval_batch_size), val_ex)

    run_dir = root / RUNS / f"finetune-{key}-ta"
    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, p.text_assignment, run_dir, eval_fn=eval_fn,
        live_dir=run_dir / "live", fingerprint=json.dumps({"key": key, "init": p.init, "start_from": p.start_from,
                                                           "text_assignment": p.text_assignment.model_dump()}),
    )  # fmt: skip
    return {"val": result.eval_metrics, "train": result.losses, "steps": result.step,
            "train_seconds": result.train_seconds}  # fmt: skip


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)):
            out[prefix + k.replace("/", "_")] = float(v)
    return out


def nlvr2_or_task_model(p: XvlmFinetuneParams, task: Any, encoder: Any, root: Path) -> Any:
    """The task model fine-tuning trains: a ``TaskModel`` with the task's head (NLVR2 with
    ``answer_features``: an :class:`~vlpipe.models.xvlm.AnswerFeatureHead`), or for NLVR2 with
    ``pair_head: tokens`` a :class:`~vlpipe.models.xvlm.TokenPairModel`."""
    from vlpipe.models.xvlm import TokenPairHead, TokenPairModel
    from vlpipe.tasks.base import TaskModel

    hidden = encoder.hidden_size
    if p.pair_head == "tokens":
        answers, n = vqa_answer_head(p, hidden, root) if p.answer_features else (None, 0)
        head = TokenPairHead(hidden, int(encoder.config.num_attention_heads), p.pair_head_layers, answers, n)
        return TokenPairModel(encoder, head)
    head = answer_feature_head(p, hidden, root) if p.answer_features else task.build_head(hidden)
    return TaskModel(encoder, head, task.num_images)


def answer_feature_head(p: XvlmFinetuneParams, hidden_size: int, root: Path) -> Any:
    """``answer_features``: an NLVR2 :class:`~vlpipe.models.xvlm.AnswerFeatureHead` around the
    answer head of the VQA task model ``start_from`` (its weights, every key and shape checked)."""
    from vlpipe.models.xvlm import AnswerFeatureHead

    answers, n = vqa_answer_head(p, hidden_size, root)
    return AnswerFeatureHead(answers, hidden_size, n, symmetric=p.symmetric_head)


def vqa_answer_head(p: XvlmFinetuneParams, hidden_size: int, root: Path) -> tuple[Any, int]:
    """The answer head of the VQA task model ``start_from`` (weights copied, every key and shape
    checked) and its number of answers."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint

    source = root / p.start_from
    info = read_json(source / "task.json")
    if info.get("model") != MODEL or info.get("task") != "vqa":
        raise InputError(source / "task.json", f"answer_features needs an X-VLM VQA model to start from, got {info}")
    vqa = make_task("vqa", root / WORLD)
    answers = vqa.build_head(hidden_size)
    state = {k.removeprefix("head."): v for k, v in read_checkpoint(source / "model.safetensors").items()
             if k.startswith("head.")}  # fmt: skip
    load_state_dict_into(answers, state, source / "model.safetensors")
    return answers, vqa.num_answers


def save_task_model(model: Any, p: XvlmFinetuneParams, out_dir: Path) -> None:
    """config.json (the X-VLM config) + model.safetensors (encoder.* and head.*) + task.json."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(model.encoder.config.to_json_string(), encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        info = {"model": MODEL, "task": p.task, "num_images": model.num_images}
        if p.answer_features:  # the head's shape: load_task_model rebuilds it from this
            info["answer_features"] = int(model.head.answers.logit_fc[-1].out_features)
        if p.pair_head != "cls":
            info["pair_head"], info["pair_head_layers"] = p.pair_head, p.pair_head_layers
        for name in READING_OPTIONS:  # how the model reads its pairs: submit checks params against it
            if getattr(p, name):
                info[name] = True
        write_json(tmp / "task.json", info)


def load_task_model(model_dir: Path, task: Any) -> Any:
    """Rebuild a model written by :func:`save_task_model`; every key and shape is checked."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint
    from vlpipe.models.xvlm import Xvlm, XvlmEncoder, XvlmGrounder, build_box_head, load_xvlm_config
    from vlpipe.tasks.base import TaskModel

    info = read_json(model_dir / "task.json")
    if info.get("model") != MODEL or info.get("task") != task.name:
        raise InputError(model_dir / "task.json", f"not an X-VLM {task.name} model: {info}")
    config = load_xvlm_config(model_dir)
    config.tasks = FINETUNE_TASKS[task.name]
    encoder = XvlmEncoder(Xvlm(config), task.num_images)
    if task.name == "refcoco":
        model = XvlmGrounder(encoder, build_box_head(config, encoder.vision.width, encoder.vision.grid))
    elif info.get("pair_head") == "tokens":
        from vlpipe.models.layers import AnswerHead
        from vlpipe.models.xvlm import TokenPairHead, TokenPairModel

        n_answers = int(info.get("answer_features", 0))
        answers = AnswerHead(encoder.hidden_size, n_answers) if n_answers else None
        head = TokenPairHead(encoder.hidden_size, int(config.num_attention_heads), int(info["pair_head_layers"]),
                             answers, n_answers)  # fmt: skip
        model = TokenPairModel(encoder, head)
    elif info.get("answer_features"):
        from vlpipe.models.layers import AnswerHead
        from vlpipe.models.xvlm import AnswerFeatureHead

        n_answers = int(info["answer_features"])
        head = AnswerFeatureHead(AnswerHead(encoder.hidden_size, n_answers), encoder.hidden_size, n_answers,
                                 symmetric=bool(info.get("symmetric_head", False)))  # fmt: skip
        model = TaskModel(encoder, head, task.num_images)
    else:
        model = TaskModel(encoder, task.build_head(encoder.hidden_size), task.num_images)
    load_state_dict_into(model, read_checkpoint(model_dir / "model.safetensors"), model_dir)
    model.eval()
    return model


# ------------------------------------------------------------------ leaderboard


def run_submit(key: str, params_path: Path, root: Path) -> None:
    """Stage ``submit@xvlm-<task>``."""
    submit(key, _finetune_params(key, params_path), root)


def submit(key: str, p: XvlmFinetuneParams, root: Path) -> dict[str, Any]:
    """Predict the test split into ``leaderboard/<key>/`` and score it (the local leaderboard)."""
    if p.task == "retrieval":
        return submit_retrieval(key, p, root)
    from vlpipe.eval.leaderboard import score_submission
    from vlpipe.tasks.base import predict_all

    task = make_task(p.task, root / WORLD)
    model_dir = root / FINETUNED / key
    model = load_task_model(model_dir, task)
    info = read_json(model_dir / "task.json")
    for name in READING_OPTIONS:
        if bool(info.get(name, False)) != getattr(p, name):
            raise InputError(model_dir / "task.json", f"the model was fine-tuned with {name} "
                             f"{not getattr(p, name)}, params say {getattr(p, name)}: re-run finetune@{key}")  # fmt: skip
    visual = PixelInputs(root / WORLD, model.encoder.vision.image_size)
    collate = make_pixel_collate(task, load_tokenizer(root / TOKENIZER), visual, model.encoder.max_text_length,
                                 with_targets=False, mark_sides=p.mark_sides, own_frame=p.own_frame,
                                 own_clause_first=p.own_clause_first)  # fmt: skip
    preds = predict_all(model, task, task.examples("test"), collate, p.eval_batch_size)
    with atomic_dir(root / LEADERBOARD / key) as tmp:
        task.write_submission(preds, tmp)
    metrics = score_submission(task, task.submission_path(root / LEADERBOARD / key))
    write_metrics(root / f"metrics/leaderboard/{key}.json", metrics)
    return metrics


def submit_retrieval(key: str, p: XvlmFinetuneParams, root: Path) -> dict[str, Any]:
    """Rank the test split (ITC, top ``k_test`` re-scored by ITM), write ``test_rank.json`` and
    its recalls. Retrieval test captions are public (as COCO's), so no hidden file is needed."""
    from vlpipe.models.xvlm import load_xvlm
    from vlpipe.tasks.retrieval import rank_split, score_ranking, write_ranking

    model = load_xvlm(root / FINETUNED / key)
    model.eval()
    tok = load_tokenizer(root / TOKENIZER)
    visual = PixelInputs(root / WORLD, model.vision.image_size)
    split, _ = _retrieval_eval(tok, visual, int(model.config.max_text_length), p, "test", root)
    scores = rank_split(model, split, visual, tok, max_length=int(model.config.max_text_length),
                        batch_size=p.eval_batch_size, k=p.k_test)  # fmt: skip
    with atomic_dir(root / LEADERBOARD / key) as tmp:
        write_ranking(tmp / "test_rank.json", scores, split)
    path = root / LEADERBOARD / key / "test_rank.json"
    metrics = {"test": score_ranking(path, split), "submission": path.name, "count": len(split.texts)}
    write_metrics(root / f"metrics/leaderboard/{key}.json", metrics)
    return metrics
