"""What the tiny recipe's input choices buy: fine-tuning samples/s of the tiny LXMERT with
text padded to ``max_text_length`` (40) or to the batch's longest sentence, and with all 36
boxes or the first 12 (``max_boxes``). Ratios are against the first row, run in the same
process on the same random inputs (VQA-like: ~9-token questions, answer table of 26).

    python benchmarks/finetune_inputs.py               # CPU
    python benchmarks/finetune_inputs.py --steps 30
"""

from __future__ import annotations

import argparse
import time

import torch

from vlpipe.config import LxmertModelParams
from vlpipe.models.layers import AnswerHead
from vlpipe.models.lxmert import LxmertEncoder, build_lxmert

VOCAB, FEAT_DIM, ANSWERS = 128, 128, 26


def inputs(batch: int, pad_to: int | None, boxes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = torch.randint(7, 12, (batch,), generator=gen)  # world questions: 7-11 tokens
    width = pad_to or int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, L)
    return {
        "input_ids": torch.randint(5, VOCAB, (batch, width), generator=gen) * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(mask),
        "visual_feats": torch.randn(batch, boxes, FEAT_DIM, generator=gen),  # (B, N, D)
        "visual_pos": torch.rand(batch, boxes, 4, generator=gen),
    }


def samples_per_second(pad_to: int | None, boxes: int, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    params = LxmertModelParams(standardize_features=False)
    pre = build_lxmert(params, vocab_size=VOCAB, visual_feat_dim=FEAT_DIM, visual_pos_dim=4,
                       num_object_labels=6, num_attr_labels=8, num_answers=ANSWERS)  # fmt: skip
    encoder = LxmertEncoder(pre.lxmert)
    head = AnswerHead(encoder.hidden_size, ANSWERS)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    data = [inputs(batch, pad_to, boxes, gen) for _ in range(steps + 2)]
    targets = torch.rand(batch, ANSWERS, generator=gen).lt(0.05).float()

    def step(x: dict[str, torch.Tensor]) -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(encoder(**x)), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for x in data[:2]:  # warm-up
        step(x)
    start = time.perf_counter()
    for x in data[2:]:
        step(x)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} steps per row")
    rows = [("pad to 40, 36 boxes (before)", 40, 36), ("pad to longest, 36 boxes", None, 36),
            ("pad to 40, 12 boxes", 40, 12), ("pad to longest, 12 boxes (tiny)", None, 12)]  # fmt: skip
    base = None
    for name, pad_to, boxes in rows:
        sps = samples_per_second(pad_to, boxes, args.steps, args.batch_size)
        base = base or sps
        print(f"{name:34s} {sps:8.1f} samples/s  x{sps / base:.2f}", flush=True)


if __name__ == "__main__":
    main()
