"""Karpathy-split captioning data, ``dataset_coco.json`` (formats.md §4).

``{"images": [{"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences":
[{"raw", "tokens", "imgid", "sentid"}]}], "dataset": "coco"}``, split one of
train/val/test/restval. In our world the test images carry no sentences (they are hidden,
scored through ``hidden/captions_test.json``, see :mod:`vlpipe.data.formats.coco_captions`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlpipe.data.formats.schema import (
    Check,
    check_record,
    check_unique,
    describe,
    expect_dict,
    is_int,
    is_list,
    is_nonempty_str,
    is_object,
    is_str,
    list_of,
    one_of,
)
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

SPLITS: tuple[str, ...] = ("train", "val", "test", "restval")

_SENTENCE: dict[str, Check] = {
    "raw": is_nonempty_str,
    "tokens": list_of(is_str, min_length=1),
    "imgid": is_int,
    "sentid": is_int,
}
_IMAGE: dict[str, Check] = {
    "filepath": is_str,
    "filename": is_nonempty_str,
    "imgid": is_int,
    "cocoid": is_int,
    "split": one_of(*SPLITS),
    "sentids": list_of(is_int),
    "sentences": list_of(is_object),  # each sentence is checked against _SENTENCE below
}


def tokenize(raw: str) -> list[str]:
    """Karpathy-style tokens: lowercase words and numbers, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", raw.lower())


def _check_image(path: str | Path, i: int, image: Any) -> None:
    where = describe(i, image, "filename")
    check_record(path, where, image, _IMAGE)
    for j, sent in enumerate(image["sentences"]):
        check_record(path, f"{where}: sentence {j}", sent, _SENTENCE)
        if sent["imgid"] != image["imgid"]:
            raise InputError(path, f"{where}: sentence {j} has imgid {sent['imgid']} != {image['imgid']}")
    if [s["sentid"] for s in image["sentences"]] != image["sentids"]:
        raise InputError(path, f"{where}: sentids do not match the sentences' sentid")


def check_karpathy(path: str | Path, data: Any) -> dict:
    """Check a whole ``dataset_coco.json`` object; return it."""
    data = expect_dict(path, data, "keys")
    check_record(path, "top level", data, {"images": is_list, "dataset": is_str})
    images = data["images"]
    for i, image in enumerate(images):
        _check_image(path, i, image)
    check_unique(path, (im["imgid"] for im in images), "imgid")
    check_unique(path, (im["cocoid"] for im in images), "cocoid")
    check_unique(path, (s for im in images for s in im["sentids"]), "sentid")
    return data


def read_karpathy(path: str | Path) -> dict:
    """Read and check ``dataset_coco.json``."""
    return check_karpathy(path, read_json(path))


def write_karpathy(path: str | Path, data: Mapping[str, Any]) -> None:
    """Check, then write ``dataset_coco.json`` atomically."""
    check_karpathy(path, dict(data))
    write_json(path, dict(data), indent=None)
