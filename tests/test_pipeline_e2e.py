"""End to end: the real `dvc repro` of the DAG in a temporary copy with tiny params.

Runs every stage of dvc.yaml as a user would, then checks that a second `dvc repro`
runs nothing and that bad params stop the pipeline with a clear message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import BIN
from conftest import run as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_copy(built_pipeline: Path) -> Path:
    return built_pipeline


def test_repro_builds_every_stage_output(built_copy: Path) -> None:
    stages = yaml.safe_load((built_copy / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for out in stage.get("do", stage).get("outs", []):
            path = out if isinstance(out, str) else next(iter(out))
            if "${key}" in path:
                continue
            assert (built_copy / path).exists(), f"stage {name} did not write {path}"
    expected = ["world", "tokenizer", "detector", "features_region", "features_grid", "codebook", "generator", "paint"]
    expected += [f"pretrain/{model}" for model in ("lxmert", "xlxmert", "vlp", "xvlm")]
    keys = list(yaml.safe_load((built_copy / "params.yaml").read_text())["finetune"])
    assert len(keys) == 12
    expected += [f"{kind}/{key}" for kind in ("finetune", "leaderboard") for key in keys]
    for metrics in expected:
        assert (built_copy / "metrics" / f"{metrics}.json").is_file(), metrics
    for model in ("lxmert", "xlxmert", "vlp"):
        assert (built_copy / f"leaderboard/{model}-vqa/test_predict.json").is_file()
    assert (built_copy / "leaderboard/lxmert-nlvr2/test_predict.csv").is_file()
    assert (built_copy / "reports/paint.png").stat().st_size > 0
    assert (built_copy / "reports/report.md").is_file()


def test_xvlm_stem_starts_from_the_detector_backbone(built_copy: Path) -> None:
    """The default X-VLM is a hybrid ViT whose CNN stem is initialised from the detector's
    backbone (X-VLM's analogue of an ImageNet-trained Swin); DVC must know that it reads it."""
    import json

    from safetensors.torch import load_file

    lock = yaml.safe_load((built_copy / "dvc.lock").read_text())["stages"]["pretrain@xvlm"]
    assert "models/detector" in [d["path"] for d in lock["deps"]]
    config = json.loads((built_copy / "models/pretrained/xvlm/config.json").read_text())
    detector = json.loads((built_copy / "models/detector/config.json").read_text())
    assert config["vision_type"] == "hybrid"
    assert config["vision_config"]["stem_channels"] == detector["channels"]
    assert config["vision_config"]["stem_levels"] == [0, len(detector["channels"]) - 1]  # colour + shape stages
    stem = load_file(built_copy / "models/pretrained/xvlm/model.safetensors")
    backbone = load_file(built_copy / "models/detector/model.safetensors")
    pairs = [(k, f"backbone.{k.removeprefix('vision.stem.')}") for k in stem if k.startswith("vision.stem.")]
    assert pairs and all(b in backbone for _, b in pairs)
    # A few pre-training steps move the copied conv kernels only a little (a fresh init would be
    # off by about sqrt(2) of their norm). Norm biases and scales are left out: their detector
    # values are near the fresh init (0 / 1), so copying cannot be told from initialising, and
    # the biases' tiny norms (about 0.01) make any relative drift large.
    kernels = [(k, b) for k, b in pairs if stem[k].is_floating_point() and stem[k].dim() > 1]
    assert kernels
    for k, b in kernels:
        drift = (stem[k] - backbone[b]).norm() / backbone[b].norm().clamp_min(1e-8)
        assert drift < 0.2, (k, float(drift))


def test_generator_reads_the_painter_and_dvc_tracks_it(built_copy: Path) -> None:
    """The default generator trains on grids corrupted by the pre-trained X-LXMERT
    (``generator.corrupt_fraction``), so `pretrain@xlxmert` is upstream of `generator`."""
    params = yaml.safe_load((built_copy / "params.yaml").read_text())["generator"]
    assert params["corrupt_fraction"] > 0
    lock = yaml.safe_load((built_copy / "dvc.lock").read_text())["stages"]
    deps = [d["path"] for d in lock["generator"]["deps"]]
    assert {"models/pretrained/xlxmert", "data/tokenizer", "data/world/lxmert/train.json"} <= set(deps)
    path = "models/pretrained/xlxmert"
    pretrained = next(o["md5"] for o in lock["pretrain@xlxmert"]["outs"] if o["path"] == path)
    assert next(d["md5"] for d in lock["generator"]["deps"] if d["path"] == path) == pretrained


def test_nlvr2_starts_from_the_vqa_finetuning_and_dvc_tracks_it(built_copy: Path) -> None:
    """``finetune.lxmert-nlvr2.start_from: models/finetuned/lxmert-vqa`` puts the VQA fine-tuning
    upstream: the NLVR2 stage's lock entry records the exact VQA model it started from."""
    lock = yaml.safe_load((built_copy / "dvc.lock").read_text())["stages"]
    for model in ("lxmert", "xlxmert", "xvlm"):  # all three NLVR2 recipes start from their VQA model
        (vqa_out,) = [o for o in lock[f"finetune@{model}-vqa"]["outs"] if o["path"] == f"models/finetuned/{model}-vqa"]
        deps = {d["path"]: d for d in lock[f"finetune@{model}-nlvr2"]["deps"]}
        assert deps[f"models/finetuned/{model}-vqa"]["md5"] == vqa_out["md5"], model
        assert f"models/pretrained/{model}" not in deps, model
    assert lock["finetune@lxmert-nlvr2"]["params"]["params.yaml"]["finetune.lxmert-nlvr2"]["swap_sides"] is True


def test_xvlm_nlvr2_runs_its_text_assignment_domain_pretraining_first(built_copy: Path) -> None:
    import json

    metrics = json.loads((built_copy / "metrics/finetune/xvlm-nlvr2.json").read_text())
    ta = metrics["text_assignment"]
    assert ta["steps"] == 2 and set(ta["val"]) >= {"accuracy", "accuracy_first", "accuracy_second", "accuracy_neither"}
    assert 0.0 <= ta["val"]["accuracy"] <= 1.0 and ta["train"]["ta_ce"] > 0
    assert not (built_copy / "runs/finetune-xvlm-nlvr2-ta/checkpoints").exists()  # cleared with the stage's own
    assert "train_seconds" not in ta  # wall time only in reports/timing: metrics stay byte-stable
    timing = json.loads((built_copy / "reports/timing/finetune/xvlm-nlvr2.json").read_text())
    assert timing["text_assignment_seconds"] > 0


def test_second_repro_runs_nothing(built_copy: Path) -> None:
    r = _run([str(BIN / "dvc"), "repro"], built_copy)
    assert "Running stage" not in r.stdout, r.stdout
    assert "up to date" in r.stdout


def test_changed_param_reruns_only_the_stages_that_read_it(built_copy: Path) -> None:
    params = yaml.safe_load((built_copy / "params.yaml").read_text())
    params["finetune"]["vlp-vqa"]["eval_batch_size"] += 1  # read by finetune@vlp-vqa (and its submit)
    params["paint"]["steps"] += 1  # read by paint only
    (built_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = _run([str(BIN / "dvc"), "repro"], built_copy)
    ran = sorted(line for line in r.stdout.splitlines() if line.startswith("Running stage"))
    assert ran == [f"Running stage '{s}':" for s in ("finetune@vlp-vqa", "paint", "report", "submit@vlp-vqa")], r.stdout


def test_bad_params_stop_the_pipeline_with_a_clear_error(built_copy: Path) -> None:
    good = (built_copy / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["world"]["scene"]["n_val"] = "lots"
    (built_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        r = _run([str(BIN / "dvc"), "repro", "world"], built_copy, check=False)
        assert r.returncode != 0
        assert "world.scene.n_val" in r.stdout + r.stderr
        # No half-written output or temporary directory is left behind.
        leftovers = [p.name for p in (built_copy / "data").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        assert leftovers == []
        assert not (built_copy / "data" / "world").exists() or (built_copy / "data/world/meta.json").is_file()
    finally:  # later tests use the built copy: DVC removed data/world before running the stage
        (built_copy / "params.yaml").write_text(good)
        _run([str(BIN / "dvc"), "checkout", "-q", "world"], built_copy)


def test_paint_command_paints_one_sentence(built_copy: Path) -> None:
    out = built_copy / "painted/one.png"
    r = _run([str(BIN / "vlpipe"), "paint", "a large red circle left of a blue square", "--out", str(out)], built_copy)
    assert "painted" in r.stdout
    import cv2

    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] >= 64 and img.shape[1] >= 64


def test_probe_nlvr2_reads_the_vqa_models_of_each_family(built_copy: Path, tmp_path: Path) -> None:
    import json

    pairs = json.loads((built_copy / "data/world/nlvr2/val.json").read_text())
    for key in ("lxmert-vqa", "xlxmert-vqa", "xvlm-vqa"):
        out = tmp_path / f"{key}.json"
        r = _run([str(BIN / "vlpipe"), "probe-nlvr2", f"models/finetuned/{key}", "--out", str(out)], built_copy)
        assert "decomposed accuracy" in r.stdout
        result = json.loads(out.read_text())
        assert result["n_pairs"] == len(pairs) and result["split"] == "val"
        assert 0.0 <= result["decomposed_accuracy"] <= 1.0
        assert {"exists", "count"} <= set(result["perception"])
    # Not a VQA model: one clear line naming the file, exit 2, nothing written.
    out = tmp_path / "nlvr2.json"
    r = _run([str(BIN / "vlpipe"), "probe-nlvr2", "models/finetuned/xvlm-nlvr2", "--out", str(out)], built_copy,
             check=False)  # fmt: skip
    assert r.returncode == 2 and "task.json" in r.stderr and "not a VQA model" in r.stderr
    assert not out.exists()
