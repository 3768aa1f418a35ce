"""COCO caption ground truth and caption results (formats.md §3, §4).

Ground truth: ``{"images": [{"id": int, "file_name"}], "annotations": [{"image_id": int, "id":
int, "caption"}]}``, what ``pycocotools.coco.COCO`` loads and ``pycocoevalcap`` scores against.
Real COCO files carry more image keys and an ``info``/``licenses``/``type`` header; they are
accepted. Results: ``[{"image_id": int, "caption": str}]``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.data.formats.schema import (
    Check,
    check_record,
    check_records,
    check_unique,
    expect_dict,
    is_int,
    is_list,
    is_nonempty_str,
    is_number,
    is_object,
    is_str,
    read_records,
)
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

_IMAGE: dict[str, Check] = {"id": is_int, "file_name": is_nonempty_str}
_IMAGE_OPTIONAL: dict[str, Check] = {
    "width": is_int, "height": is_int, "license": is_int, "coco_url": is_str,
    "flickr_url": is_str, "date_captured": is_str,
}
_ANNOTATION: dict[str, Check] = {"image_id": is_int, "id": is_int, "caption": is_nonempty_str}
_HEADER: dict[str, Check] = {"info": is_object, "licenses": is_list, "type": is_str}
_RESULT: dict[str, Check] = {"image_id": is_int, "caption": is_str}
_RESULT_OPTIONAL: dict[str, Check] = {"score": is_number}


def check_caption_gt(path: str | Path, data: Any) -> dict:
    """Check a COCO caption ground-truth object; return it."""
    data = expect_dict(path, data, "keys")
    check_record(path, "top level", data, {"images": is_list, "annotations": is_list}, _HEADER)
    check_records(path, data["images"], _IMAGE, _IMAGE_OPTIONAL, id_key="id")
    check_records(path, data["annotations"], _ANNOTATION, id_key="id")
    check_unique(path, (im["id"] for im in data["images"]), "image id")
    check_unique(path, (a["id"] for a in data["annotations"]), "annotation id")
    ids = {im["id"] for im in data["images"]}
    for a in data["annotations"]:
        if a["image_id"] not in ids:
            raise InputError(path, f"annotation {a['id']}: image_id {a['image_id']} is not in images")
    return data


def read_caption_gt(path: str | Path) -> dict:
    """Read and check a COCO caption ground-truth file."""
    return check_caption_gt(path, read_json(path))


def write_caption_gt(path: str | Path, images: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]]) -> None:
    """Check, then write ``{"images", "annotations"}`` atomically."""
    data = {"images": [dict(i) for i in images], "annotations": [dict(a) for a in annotations]}
    check_caption_gt(path, data)
    write_json(path, data, indent=None)


def captions_by_image(gt: Mapping[str, Any]) -> dict[int, list[str]]:
    """``{image id: [captions]}`` of a checked ground truth, in annotation order."""
    out: dict[int, list[str]] = defaultdict(list)
    for a in gt["annotations"]:
        out[a["image_id"]].append(a["caption"])
    return dict(out)


def read_caption_results(path: str | Path) -> list[dict]:
    """Read captioning results ``[{"image_id": int, "caption": str}]`` (one per image)."""
    records = read_records(path, _RESULT, _RESULT_OPTIONAL, id_key="image_id")
    check_unique(path, (r["image_id"] for r in records), "image_id")
    return records
