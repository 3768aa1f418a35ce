"""Shared fixtures: tiny params so every test runs offline on CPU in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests from fighting over the two cores and from touching any hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


FAST = {"max_steps": 3, "batch_size": 8, "log_every": 1}
SMALL = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_overrides() -> dict:
    """Overrides of the default params that make the whole DAG run in seconds."""
    from vlpipe.config import dump_defaults

    return {
        "world": {
            "scene": {"n_train": 48, "n_val": 16, "n_test": 16},
            "text": {"nlvr2_sentences": {"train": 12, "val": 6, "test": 6}},
        },
        "tokenizer": {"vocab_size": 200},
        "detector": {"epochs": 1, "channels": [8, 16], "feature_dim": 16, "batch_size": 16},
        "features": {"region": {"num_boxes": 8}},
        "codebook": {"k": 8, "iterations": 3},
        "pretrain": {
            "lxmert": {
                "model": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
                "train": dict(FAST),
                "val_max_examples": 16,
            },
            "xlxmert": {"model": dict(SMALL), "train": dict(FAST), "val_max_examples": 16},
            "vlp": {"model": dict(SMALL), "train": dict(FAST), "val_max_examples": 16},
            "xvlm": {"train": dict(FAST), "val_max_images": 8},
        },
        "generator": {"train": dict(FAST), "val_max_images": 8},
        "paint": {"num_captions": 8, "steps": 2, "sheet_size": 4, "rprecision_candidates": 4},
        "finetune": {
            key: {"train": {"max_steps": 2, "batch_size": 8, "log_every": 1}}
            for key in dump_defaults()["finetune"]
        }
        | {"vlp-caption": {"train": {"max_steps": 2, "batch_size": 8, "log_every": 1}, "beam_size": 2, "max_length": 8}},
    }


def deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


@pytest.fixture
def tiny_params() -> dict:
    """The default params with :func:`tiny_overrides` applied (plain data)."""
    from vlpipe.config import dump_defaults

    return deep_update(dump_defaults(), tiny_overrides())


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated world (data/world layout), shared by the tests that read world files."""
    from vlpipe.config import WorldParams
    from vlpipe.data.world import generate_world

    out = tmp_path_factory.mktemp("world") / "world"
    out.mkdir()
    params = WorldParams.model_validate(deep_update(WorldParams().model_dump(mode="json"), tiny_overrides()["world"]))
    generate_world(params, out)
    return out
