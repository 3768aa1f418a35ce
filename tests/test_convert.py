"""Reference LXMERT checkpoints (model_LXRT.pth, BEST.pth, HF dirs) -> our layout."""

from __future__ import annotations

import pytest
import torch

from vlpipe.config import LxmertModelParams
from vlpipe.errors import InputError
from vlpipe.models.convert import (
    detect_layout,
    load_reference_checkpoint,
    read_checkpoint,
    transfer_answer_head,
)
from vlpipe.models.lxmert import build_lxmert, save_lxmert

SIZES = dict(vocab_size=40, visual_feat_dim=10, visual_pos_dim=4, num_object_labels=6, num_attr_labels=4)
B, L, N = 3, 7, 4


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(seed: int, num_answers: int = 8, hidden: int = 32, **kw):
    torch.manual_seed(seed)
    kw.setdefault("standardize_features", False)
    params = LxmertModelParams(hidden_size=hidden, num_attention_heads=2, intermediate_size=64, **kw)
    return build_lxmert(params, num_answers=num_answers, **SIZES).eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, SIZES["vocab_size"], (B, L), generator=g),
        "attention_mask": torch.ones(B, L, dtype=torch.long),
        "visual_feats": torch.rand(B, N, SIZES["visual_feat_dim"], generator=g),
        "visual_pos": torch.rand(B, N, 4, generator=g),
    }


def as_lxrt_pretrain(model) -> dict[str, torch.Tensor]:
    """Our state dict under the reference names: nn.DataParallel's ``module.`` and ``bert.``."""
    out = {}
    for key, value in model.state_dict().items():
        key = "bert." + key[len("lxmert.") :] if key.startswith("lxmert.") else key
        out["module." + key] = value.clone()
    return out


def as_lxrt_finetuned(model) -> dict[str, torch.Tensor]:
    """A VQA ``BEST.pth``: encoder under ``lxrt_encoder.model.bert.``, head under ``logit_fc.``."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("lxmert."):
            out["lxrt_encoder.model.bert." + key[len("lxmert.") :]] = value.clone()
        elif key.startswith("answer_head.logit_fc."):
            out[key[len("answer_head.") :]] = value.clone()
    return out


def same_outputs(a, b) -> None:
    oa, ob = a(**inputs()), b(**inputs())
    for name in ("mlm_logits", "match_logits", "obj_logits", "attr_logits", "feat_pred", "qa_logits"):
        assert torch.equal(getattr(oa, name), getattr(ob, name)), name


def test_model_lxrt_pth_converts_and_loads_exactly(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    state = as_lxrt_pretrain(source)
    assert "module.bert.encoder.x_layers.0.visual_attention.att.query.weight" in state
    assert "module.answer_head.logit_fc.3.weight" in state and "module.obj_predict_head.decoder_dict.feat.bias" in state
    path = tmp_path / "model_LXRT.pth"
    torch.save(state, path)
    assert detect_layout(read_checkpoint(path)) == "lxrt_pretrain"
    report = load_reference_checkpoint(target, path)
    assert report.missing == () and report.ignored == ()
    same_outputs(source, target)
    assert target.cls.predictions.decoder.weight is target.lxmert.embeddings.word_embeddings.weight


def test_finetuned_best_pth_loads_encoder_and_answer_head(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "BEST.pth"
    torch.save(as_lxrt_finetuned(source), path)
    assert detect_layout(read_checkpoint(path)) == "lxrt_finetuned"
    with pytest.raises(InputError, match="missing keys: cls"):  # pre-training heads are not in BEST.pth
        load_reference_checkpoint(target, path)
    report = load_reference_checkpoint(target, path, allow_missing=("cls.", "obj_predict_head."))
    assert report.missing and all(k.startswith(("cls.", "obj_predict_head.")) for k in report.missing)
    oa, ob = source(**inputs()), target(**inputs())
    assert torch.equal(oa.pooled_output, ob.pooled_output) and torch.equal(oa.qa_logits, ob.qa_logits)


def test_hf_directory_loads(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    save_lxmert(source, tmp_path / "hf")
    assert detect_layout(read_checkpoint(tmp_path / "hf")) == "ours"
    load_reference_checkpoint(target, tmp_path / "hf")
    same_outputs(source, target)


def test_mismatched_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "model_LXRT.pth"
    torch.save(as_lxrt_pretrain(tiny(seed=1, hidden=64)), path)
    with pytest.raises(InputError, match="shape mismatches") as err:
        load_reference_checkpoint(tiny(seed=2), path)
    assert str(path) in str(err.value) and "(file (64," in str(err.value)

    state = as_lxrt_pretrain(tiny(seed=1))
    del state["module.bert.pooler.dense.weight"]
    state["module.bert.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(InputError, match="missing keys: lxmert.pooler.dense.weight") as err:
        load_reference_checkpoint(tiny(seed=2), path)
    assert "unexpected keys: lxmert.extra.weight" in str(err.value)

    torch.save({"module.bert.x": torch.zeros(1), "weird.key": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="unexpected keys for this checkpoint layout: weird.key"):
        load_reference_checkpoint(tiny(seed=2), path)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "model_LXRT.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not a readable checkpoint") as err:
        read_checkpoint(bad)
    assert err.value.path == bad
    torch.save({"a": [1, 2]}, bad)
    with pytest.raises(InputError, match="expected a state dict"):
        read_checkpoint(bad)
    with pytest.raises(InputError, match="no weights file"):
        read_checkpoint(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_pickles_are_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"module.bert.x": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(InputError, match="not a readable checkpoint"):
        read_checkpoint(path)


def test_transfer_answer_head_copies_shared_answers():
    old_table = ["yes", "no", "red", "two"]
    new_table = ["blue", "Two", "yes", "circle", "red"]
    source = tiny(seed=1, num_answers=len(old_table)).state_dict()
    fresh = tiny(seed=2, num_answers=len(new_table)).state_dict()
    state, copied = transfer_answer_head(source, old_table, new_table, init=fresh, normalize=str.lower)
    assert copied == 3
    w, b = state["answer_head.logit_fc.3.weight"], state["answer_head.logit_fc.3.bias"]
    assert w.shape == (5, 64) and b.shape == (5,)
    for new_row, old_row in ((1, 3), (2, 0), (4, 2)):
        assert torch.equal(w[new_row], source["answer_head.logit_fc.3.weight"][old_row])
        assert torch.equal(b[new_row], source["answer_head.logit_fc.3.bias"][old_row])
    for new_row in (0, 3):  # unseen answers keep the target's init
        assert torch.equal(w[new_row], fresh["answer_head.logit_fc.3.weight"][new_row])
    assert torch.equal(state["answer_head.logit_fc.0.weight"], source["answer_head.logit_fc.0.weight"])
    # the transferred state loads into a model with the new table
    target = tiny(seed=3, num_answers=len(new_table))
    target.load_state_dict(state)
    zero_init, n = transfer_answer_head(source, {0: "yes", 1: "no", 2: "red", 3: "two"}, ["maybe", "no"])
    assert n == 1 and zero_init["answer_head.logit_fc.3.weight"][0].abs().sum() == 0


def test_import_lxmert_writes_an_hf_directory_with_identical_outputs(tmp_path):
    from vlpipe.models.convert import import_lxmert
    from vlpipe.models.lxmert import load_lxmert

    source = tiny(seed=3, l_layers=2, x_layers=1, r_layers=1)
    path = tmp_path / "model_LXRT.pth"
    torch.save(as_lxrt_pretrain(source), path)
    info = import_lxmert(path, tmp_path / "out", num_attention_heads=2)
    assert info["layers"] == (2, 1, 1) and info["hidden"] == 32
    imported = load_lxmert(tmp_path / "out").eval()
    same_outputs(source, imported)


def test_import_lxmert_rejects_a_non_lxmert_file(tmp_path):
    from vlpipe.models.convert import import_lxmert

    path = tmp_path / "other.pth"
    torch.save({"module.foo.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(InputError, match="other.pth"):
        import_lxmert(path, tmp_path / "out")
