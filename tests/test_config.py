"""Strict params validation: unknown keys, wrong types and bad ranges fail, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from vlpipe.config import Params, ParamsError, dump_defaults, load_params, load_section


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_repo_params_file_is_valid(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)


def test_repo_params_file_sets_every_default_key(repo_root: Path) -> None:
    """params.yaml is the single source of truth: every setting is written there."""

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    on_disk = yaml.safe_load((repo_root / "params.yaml").read_text())
    missing = keys(dump_defaults()) - keys(on_disk)
    assert not missing, f"params.yaml lacks keys: {sorted(missing)}"


def test_repo_params_file_is_the_tiny_preset(repo_root: Path) -> None:
    """The defaults in vlpipe.config (what ``vlpipe preset tiny`` writes) and params.yaml agree
    value for value, so a default changed in one place is changed in both."""
    assert load_params(repo_root / "params.yaml").model_dump(mode="json") == dump_defaults()


def test_unknown_key_is_rejected_with_path(tmp_path: Path) -> None:
    data = dump_defaults()
    data["world"]["scene"]["n_trian"] = 5
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, data))
    msg = str(e.value)
    assert "params.yaml" in msg and "world.scene.n_trian" in msg and "unknown key" in msg


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    data = dump_defaults()
    data["wrold"] = {}
    with pytest.raises(ParamsError, match="wrold: unknown key"):
        load_params(_write(tmp_path, data))


def test_wrong_type_is_rejected_without_coercion(tmp_path: Path) -> None:
    data = dump_defaults()
    data["world"]["scene"]["n_train"] = "100"  # a string is not an int, even if it looks like one
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, data))
    assert "world.scene.n_train" in str(e.value) and "'100'" in str(e.value)


def test_params_are_read_as_yaml_1_2_like_dvc(tmp_path: Path) -> None:
    # `dvc exp run -S` rewrites params.yaml with ruamel (YAML 1.2): `no` stays unquoted and
    # must stay the string "no"; `2e-3` is a float in YAML 1.2 (PyYAML would say string).
    p = tmp_path / "params.yaml"
    p.write_text("detector:\n  lr: 2e-3\ngenerator:\n  train:\n    mixed_precision: no\n")
    params = load_params(p)
    assert params.detector.lr == 0.002
    assert params.generator.train.mixed_precision == "no"


def test_yaml_1_1_booleans_are_not_strings(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("generator:\n  train:\n    mixed_precision: false\n")
    with pytest.raises(ParamsError, match="generator.train.mixed_precision"):
        load_params(p)


def test_out_of_range_is_rejected(tmp_path: Path) -> None:
    data = dump_defaults()
    data["world"]["scene"]["max_occlusion"] = 1.5
    with pytest.raises(ParamsError, match="world.scene.max_occlusion"):
        load_params(_write(tmp_path, data))


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("world: [unclosed\n")
    with pytest.raises(ParamsError, match="malformed YAML"):
        load_params(p)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_load_section_returns_only_that_section(tmp_path: Path) -> None:
    data = dump_defaults()
    data["tokenizer"]["vocab_size"] = 321
    sec = load_section("tokenizer", _write(tmp_path, data))
    assert sec.vocab_size == 321 and not hasattr(sec, "scene")


def test_cli_reports_params_error_and_exits_nonzero(tmp_path: Path) -> None:
    data = dump_defaults()
    data["codebook"]["k"] = "many"
    p = _write(tmp_path, data)
    r = subprocess.run(
        [sys.executable, "-m", "vlpipe", "check-params", "--params", str(p)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "codebook.k" in r.stderr and str(p) in r.stderr and "Traceback" not in r.stderr


def test_lxmert_base_preset_is_the_papers_recipe(tmp_path: Path) -> None:
    out = tmp_path / "base.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "vlpipe", "preset", "lxmert-base", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    p = load_params(out)  # the written file passes the strict validation
    m, t = p.pretrain.lxmert.model, p.pretrain.lxmert.train
    assert (m.hidden_size, m.num_attention_heads, m.intermediate_size) == (768, 12, 3072)
    assert (m.l_layers, m.x_layers, m.r_layers, m.max_text_length) == (9, 5, 5, 20)
    assert m.max_boxes is None and not m.standardize_features  # all 36 boxes, raw features
    assert (t.optimizer, t.lr, t.batch_size, t.epochs, t.warmup_ratio, t.max_grad_norm) == (
        "bertadam",
        1e-4,
        256,
        20,
        0.05,
        1.0,
    )
    lrs = {k: (f.train.lr, f.train.batch_size, f.train.epochs) for k, f in p.finetune.items()}
    assert lrs == {"lxmert-vqa": (5e-5, 32, 4), "lxmert-gqa": (1e-5, 32, 4), "lxmert-nlvr2": (5e-5, 32, 4)}
    bad = subprocess.run([sys.executable, "-m", "vlpipe", "preset", "huge", "--out", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown preset" in bad.stderr and not (tmp_path / "x.yaml").exists()


def test_every_stage_key_resolves_to_its_runner(tmp_path):
    """Each default finetune entry dispatches by its (model, task); unknown names are clear errors."""
    import inspect

    import yaml

    from vlpipe.config import dump_defaults
    from vlpipe.errors import VlpipeError
    from vlpipe.stages import FINETUNE, stage_runner

    params = tmp_path / "params.yaml"
    data = dump_defaults()
    params.write_text(yaml.safe_dump(data))
    for model in ("lxmert", "xlxmert", "vlp", "xvlm"):
        assert list(inspect.signature(stage_runner("pretrain", model, params)).parameters) == ["params_path", "root"]
    for key, entry in data["finetune"].items():
        module = FINETUNE[(entry["model"], entry["task"])][0]
        for kind in ("finetune", "submit"):
            fn = stage_runner(kind, key, params)
            assert fn.__module__ == f"vlpipe.stages.{module}"
            assert list(inspect.signature(fn).parameters) == ["key", "params_path", "root"]
    with pytest.raises(VlpipeError, match="no finetune entry 'lxmert-foo'"):
        stage_runner("finetune", "lxmert-foo", params)
    with pytest.raises(VlpipeError, match="unknown model"):
        stage_runner("pretrain", "clip", params)


def test_finetune_entries_are_typed_by_model_and_task(tmp_path):
    from vlpipe.config import CaptionParams, FinetuneParams, Params, XvlmFinetuneParams

    p = Params.model_validate({"finetune": {
        "vlp-caption": {"model": "vlp", "task": "caption", "beam_size": 5},
        "vlp-vqa": {"model": "vlp", "task": "vqa"},
        "xvlm-refcoco": {"model": "xvlm", "task": "refcoco", "k_test": 4},
        "xlxmert-gqa": {"model": "xlxmert", "task": "gqa"},
    }})  # fmt: skip
    assert isinstance(p.finetune["vlp-caption"], CaptionParams) and p.finetune["vlp-caption"].beam_size == 5
    assert isinstance(p.finetune["vlp-vqa"], FinetuneParams)
    assert isinstance(p.finetune["xvlm-refcoco"], XvlmFinetuneParams)
    assert isinstance(p.finetune["xlxmert-gqa"], FinetuneParams)
    with pytest.raises(ValidationError, match="beam_size"):
        Params.model_validate({"finetune": {"vlp-vqa": {"model": "vlp", "task": "vqa", "beam_size": 5}}})
    with pytest.raises(ValidationError, match="not available"):
        Params.model_validate({"finetune": {"vlp-gqa": {"model": "vlp", "task": "gqa"}}})


def test_start_from_is_the_pretrained_model_or_another_finetuning_of_the_same_model():
    entries = {"lxmert-vqa": {"model": "lxmert", "task": "vqa"}, "lxmert-gqa": {"model": "lxmert", "task": "gqa"},
               "xlxmert-vqa": {"model": "xlxmert", "task": "vqa"}, "vlp-vqa": {"model": "vlp", "task": "vqa"},
               "vlp-caption": {"model": "vlp", "task": "caption"}, "xvlm-vqa": {"model": "xvlm", "task": "vqa"}}  # fmt: skip

    def params(**start: str) -> Params:
        data = {k: dict(v, **({"start_from": start[k]} if k in start else {})) for k, v in entries.items()}
        return Params.model_validate({"finetune": data})

    p = params(**{"lxmert-gqa": "models/finetuned/lxmert-vqa"})
    assert {k: e.start_from for k, e in p.finetune.items()} == {
        "lxmert-vqa": "models/pretrained/lxmert", "lxmert-gqa": "models/finetuned/lxmert-vqa",
        "xlxmert-vqa": "models/pretrained/xlxmert", "vlp-vqa": "models/pretrained/vlp",
        "vlp-caption": "models/pretrained/vlp", "xvlm-vqa": "models/pretrained/xvlm"}  # fmt: skip
    bad = {
        "lxmert-gqa": ("models/finetuned/xlxmert-vqa", "fine-tunes 'xlxmert', not 'lxmert'"),
        "lxmert-vqa": ("models/finetuned/lxmert-vqa", "comes back to 'lxmert-vqa'"),
        "xlxmert-vqa": ("models/finetuned/xlxmert-gqa", "expected models/pretrained/xlxmert or models/finetuned"),
        "vlp-vqa": ("models/finetuned/vlp-caption", "a vlp fine-tuning starts from models/pretrained/vlp"),
        "xvlm-vqa": ("models/pretrained/lxmert", "expected models/pretrained/xvlm"),
    }
    for key, (start, message) in bad.items():
        with pytest.raises(ValidationError, match=f"finetune.{key}.start_from: .*{message}"):
            params(**{key: start})
    with pytest.raises(ValidationError, match="comes back to 'lxmert-vqa'"):  # a two-step cycle
        params(**{"lxmert-vqa": "models/finetuned/lxmert-gqa", "lxmert-gqa": "models/finetuned/lxmert-vqa"})
    with pytest.raises(ValidationError, match="init must be 'pretrained' or 'scratch'"):
        Params.model_validate({"finetune": {**entries, "lxmert-gqa": {
            "model": "lxmert", "task": "gqa", "init": "/ckpt/BEST.pth", "start_from": "models/finetuned/lxmert-vqa"}}})  # fmt: skip


def test_swap_sides_is_for_nlvr2_only():
    assert Params.model_validate({"finetune": {"lxmert-nlvr2": {"model": "lxmert", "task": "nlvr2", "swap_sides": True}}})
    for key, model, task in (("lxmert-vqa", "lxmert", "vqa"), ("xvlm-refcoco", "xvlm", "refcoco")):
        with pytest.raises(ValidationError, match="swap_sides is for NLVR2 only"):
            Params.model_validate({"finetune": {key: {"model": model, "task": task, "swap_sides": True}}})


def test_mark_sides_is_for_nlvr2_only():
    assert Params.model_validate({"finetune": {"lxmert-nlvr2": {"model": "lxmert", "task": "nlvr2", "mark_sides": True}}})
    with pytest.raises(ValidationError, match="mark_sides is for NLVR2 only"):
        Params.model_validate({"finetune": {"lxmert-gqa": {"model": "lxmert", "task": "gqa", "mark_sides": True}}})
    assert Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "mark_sides": True}}})
    with pytest.raises(ValidationError, match="mark_sides is for NLVR2 only"):
        Params.model_validate({"finetune": {"xvlm-vqa": {"model": "xvlm", "task": "vqa", "mark_sides": True}}})
    assert Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "own_frame": True}}})
    with pytest.raises(ValidationError, match="own_frame is for NLVR2 only"):
        Params.model_validate({"finetune": {"xvlm-vqa": {"model": "xvlm", "task": "vqa", "own_frame": True}}})
    with pytest.raises(ValidationError, match="own_clause_first"):
        Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "own_clause_first": True}}})
    assert Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "own_frame": True,
                                                              "own_clause_first": True}}})  # fmt: skip


def test_pair_fusion_is_xvlm_nlvr2s_only():
    ok = Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "pair_fusion": "twin"}}})
    assert ok.finetune["xvlm-nlvr2"].pair_fusion == "twin"
    with pytest.raises(ValidationError, match="pair_fusion is for NLVR2 only"):
        Params.model_validate({"finetune": {"xvlm-vqa": {"model": "xvlm", "task": "vqa", "pair_fusion": "twin"}}})
    with pytest.raises(ValidationError, match="pair_fusion"):
        Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "pair_fusion": "sum"}}})
    with pytest.raises(ValidationError, match="pair_fusion"):  # LXMERT reads one image per row
        Params.model_validate({"finetune": {"lxmert-nlvr2": {"model": "lxmert", "task": "nlvr2", "pair_fusion": "twin"}}})


def test_mirror_is_for_vqa_and_gqa_only():
    p = Params.model_validate({"finetune": {"lxmert-gqa": {"model": "lxmert", "task": "gqa", "mirror": "both"}}})
    assert p.finetune["lxmert-gqa"].mirror == "both"
    with pytest.raises(ValidationError, match="mirror is for VQA / GQA only"):
        Params.model_validate({"finetune": {"lxmert-nlvr2": {"model": "lxmert", "task": "nlvr2", "mirror": "horizontal"}}})
    with pytest.raises(ValidationError, match="mirror"):
        Params.model_validate({"finetune": {"lxmert-gqa": {"model": "lxmert", "task": "gqa", "mirror": "diagonal"}}})


def test_text_assignment_is_nlvr2s_domain_pretraining_only():
    p = Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "text_assignment": {"epochs": 1}}}})
    assert p.finetune["xvlm-nlvr2"].text_assignment.epochs == 1
    with pytest.raises(ValidationError, match="text_assignment is NLVR2's domain pre-training"):
        Params.model_validate({"finetune": {"xvlm-vqa": {"model": "xvlm", "task": "vqa", "text_assignment": {"epochs": 1}}}})
    with pytest.raises(ValidationError, match="text_assignment"):
        Params.model_validate({"finetune": {"xvlm-nlvr2": {"model": "xvlm", "task": "nlvr2", "text_assignment": {"epoch": 1}}}})
