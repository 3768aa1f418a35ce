"""LXMERT pre-training throughput: samples/s at the tiny and base sizes, and (on a GPU) MFU.

Runs full pre-training steps (masking, forward with every head, backward, AdamW step) on
random inputs of the reference shapes (36 boxes, text length 20 for base / 40 for tiny), so
it measures the model and the optimizer, not data loading. Model FLOPs per sample are
estimated as 6 x parameters x tokens (text + boxes), the usual transformer approximation;
MFU divides achieved FLOP/s by the device's peak (``--peak-tflops``, bf16 dense; 989 for
H100 SXM), and is printed only on a GPU.

    python benchmarks/train_throughput.py                 # CPU: tiny and base
    python benchmarks/train_throughput.py --sizes tiny --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch

from vlpipe.config import LxmertModelParams
from vlpipe.models.lxmert import build_lxmert, mask_pretrain_batch

FEAT_DIM, BOXES, VOCAB, ANSWERS = 2048, 36, 30522, 9500


def batch(b: int, length: int, feat_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "input_ids": torch.randint(5, VOCAB, (b, length), generator=g),
        "attention_mask": torch.ones(b, length, dtype=torch.long),
        "token_type_ids": torch.zeros(b, length, dtype=torch.long),
        "visual_feats": torch.rand(b, BOXES, feat_dim, generator=g),
        "visual_pos": torch.rand(b, BOXES, 4, generator=g),
        "obj_labels": torch.randint(0, 1600, (b, BOXES), generator=g),
        "obj_conf": torch.rand(b, BOXES, generator=g),
        "attr_labels": torch.randint(0, 400, (b, BOXES), generator=g),
        "attr_conf": torch.rand(b, BOXES, generator=g),
        "qa_targets": torch.rand(b, ANSWERS, generator=g).lt(0.001).float(),
        "qa_valid": torch.ones(b, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in out.items()}


def run(size: str, steps: int, batch_size: int, device: torch.device, dtype: torch.dtype | None, peak: float) -> None:
    params = LxmertModelParams.preset(size, max_text_length=20 if size == "base" else 40, standardize_features=False)
    torch.manual_seed(0)
    model = build_lxmert(params, vocab_size=VOCAB, visual_feat_dim=FEAT_DIM, visual_pos_dim=4,
                         num_object_labels=1600, num_attr_labels=400, num_answers=ANSWERS).to(device)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    data = batch(batch_size, params.max_text_length, FEAT_DIM, device)
    kw = {"mask_token_id": 4, "special_token_ids": [0, 1, 2, 3, 4], "vocab_size": VOCAB}

    def step() -> None:
        inputs = mask_pretrain_batch(data, params, **kw)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**inputs).losses["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (allocator, kernels)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sps = steps * batch_size / seconds
    flops = 6 * n_params * (params.max_text_length + BOXES) * sps
    line = f"{size:5s} params {n_params / 1e6:7.1f}M  batch {batch_size:4d}  {sps:9.1f} samples/s  {flops / 1e12:7.3f} TFLOP/s"
    if device.type == "cuda":
        line += f"  MFU {flops / (peak * 1e12):.1%} (peak {peak} TFLOP/s)"
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 64 tiny / 8 base on CPU, 256/64 on GPU")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    print(f"device {device}, threads {torch.get_num_threads()}, autocast {dtype}")
    for size in args.sizes:
        bs = args.batch_size or {("cpu", "tiny"): 64, ("cpu", "base"): 8, ("cuda", "tiny"): 256, ("cuda", "base"): 64}[
            (device.type, size)
        ]
        run(size, args.steps, bs, device, dtype, args.peak_tflops)


if __name__ == "__main__":
    main()
