"""vlpipe.io: atomic writes, metrics without wall-clock figures, rank-0-only writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpipe.io import atomic_dir, timing_path, write_json, write_metrics


def test_metrics_file_has_no_wall_clock_figures(tmp_path: Path) -> None:
    path = tmp_path / "metrics/finetune/x.json"
    write_metrics(path, {"val": {"acc": 0.5}, "steps": 3, "samples_per_second": 12.3456789, "train_seconds": 4.0})
    assert json.loads(path.read_text()) == {"steps": 3, "val": {"acc": 0.5}}
    timing = json.loads((tmp_path / "reports/timing/finetune/x.json").read_text())
    assert timing == {"processes": 1, "samples_per_second": 12.345679, "train_seconds": 4.0}


def test_metrics_without_timing_write_no_timing_file(tmp_path: Path) -> None:
    write_metrics(tmp_path / "metrics/world.json", {"scenes": 3})
    assert not (tmp_path / "reports").exists()


def test_timing_path_mirrors_the_metrics_path() -> None:
    assert timing_path(Path("/r/metrics/pretrain/lxmert.json")) == Path("/r/reports/timing/pretrain/lxmert.json")
    assert timing_path(Path("elsewhere/m.json")) == Path("elsewhere/m.timing.json")


def test_metrics_bytes_are_stable(tmp_path: Path) -> None:
    a, b = tmp_path / "metrics/a.json", tmp_path / "metrics/b.json"
    write_metrics(a, {"x": 0.1 + 0.2, "y": {"b": 1, "a": 2}, "seconds": 1.0})
    write_metrics(b, {"y": {"a": 2, "b": 1}, "x": 0.30000000000000004, "seconds": 2.0})
    assert a.read_bytes() == b.read_bytes()


def test_only_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    write_json(tmp_path / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    write_json(tmp_path / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "model"]


def test_failed_atomic_dir_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "model") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
