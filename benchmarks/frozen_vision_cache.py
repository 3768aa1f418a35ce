"""What ``vision_cache_mb`` buys: X-VLM VQA fine-tuning samples/s with the image encoder frozen
(``freeze_vision``, the VQA / NLVR2 default), encoding every image at every step against
encoding each image once (:class:`vlpipe.models.xvlm.FrozenFeatureCache`). The default
pre-training model size (params.yaml, random weights), VQA-like batches over a fixed pool of
images that every epoch revisits; the cached row is timed after one pass over the pool (an
epoch's second pass onwards). Ratios are against the first row, in the same process.

    python benchmarks/frozen_vision_cache.py
    python benchmarks/frozen_vision_cache.py --steps 30 --images 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vlpipe.config import load_section
from vlpipe.models.layers import AnswerHead
from vlpipe.models.xvlm import XvlmEncoder, build_xvlm

VOCAB, ANSWERS = 1000, 100
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def samples_per_second(cache: bool, steps: int, batch: int, images: int) -> float:
    torch.manual_seed(0)
    params = load_section("pretrain", PARAMS).xvlm.model.model_copy(update={"vision_init": None})
    model = build_xvlm(params, vocab_size=VOCAB)
    model.vision.requires_grad_(False)  # freeze_vision
    encoder = XvlmEncoder(model)
    if cache:
        encoder.cache_frozen_vision(2**30)
    head = AnswerHead(encoder.hidden_size, ANSWERS)
    opt = torch.optim.AdamW([q for q in [*encoder.parameters(), *head.parameters()] if q.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(images, 3, params.image_size, params.image_size, generator=gen)  # (P, 3, S, S)
    mask = torch.ones(batch, 12, dtype=torch.long)  # world questions: about 12 tokens

    def step(k: int) -> None:
        rows = torch.arange(k * batch, (k + 1) * batch) % images
        x = {"input_ids": torch.randint(5, VOCAB, (batch, 12), generator=gen), "attention_mask": mask,
             "pixel_values": pool[rows]}  # fmt: skip
        targets = torch.rand(batch, ANSWERS, generator=gen).lt(0.05).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(encoder(**x)), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = -(-images // batch)  # one pass over the pool: every image is in the cache after it
    for k in range(warm):
        step(k)
    start = time.perf_counter()
    for k in range(warm, warm + steps):
        step(k)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=128, help="size of the image pool the batches revisit")
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} steps per row")
    base = None
    for name, cache in (("frozen, encoded every step", False), ("frozen, cached (vision_cache_mb)", True)):
        sps = samples_per_second(cache, args.steps, args.batch_size, args.images)
        base = base or sps
        print(f"{name:34s} {sps:8.1f} samples/s  x{sps / base:.2f}", flush=True)


if __name__ == "__main__":
    main()
