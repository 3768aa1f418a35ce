"""The tokenizer stage: WordPiece trained on the world's training text, loadable by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import BertTokenizerFast

from vlpipe.config import TokenizerParams
from vlpipe.data.tokenizer import build_tokenizer, load_tokenizer, training_corpus
from vlpipe.errors import InputError


@pytest.fixture(scope="module")
def tok_dir(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(TokenizerParams(vocab_size=300), tiny_world, out)
    return out


def test_loads_with_transformers_and_round_trips_training_text(tok_dir: Path, tiny_world: Path) -> None:
    tok = BertTokenizerFast.from_pretrained(str(tok_dir))
    corpus = list(training_corpus(tiny_world))
    assert len(corpus) > 100
    for sent in corpus[:300]:
        ids = tok(sent)["input_ids"]
        assert tok.unk_token_id not in ids, sent
        # Decoding gives the lower-cased sentence back up to the spaces BERT puts around
        # punctuation: no character is lost or changed.
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert "".join(decoded.split()) == "".join(sent.lower().split()), (sent, decoded)


def test_meta_records_special_ids(tok_dir: Path) -> None:
    import json

    meta = json.loads((tok_dir / "meta.json").read_text())
    tok = load_tokenizer(tok_dir)
    assert meta["vocab_size"] == len(tok)
    assert meta["mask_token_id"] == tok.mask_token_id and meta["pad_token_id"] == tok.pad_token_id == 0


def test_training_is_deterministic(tiny_world: Path, tok_dir: Path, tmp_path: Path) -> None:
    build_tokenizer(TokenizerParams(vocab_size=300), tiny_world, tmp_path)
    assert (tmp_path / "vocab.txt").read_bytes() == (tok_dir / "vocab.txt").read_bytes()


def test_only_training_split_text_is_used(tiny_world: Path, tmp_path: Path) -> None:
    # A word that appears only in val must not reach the vocab through the corpus.
    corpus = " ".join(training_corpus(tiny_world))
    assert "world_val_" not in corpus


def test_copy_source(tok_dir: Path, tiny_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "copied"
    out.mkdir()
    metrics = build_tokenizer(TokenizerParams(source="copy", path=str(tok_dir)), tiny_world, out)
    assert (out / "vocab.txt").read_bytes() == (tok_dir / "vocab.txt").read_bytes()
    assert metrics["vocab_size"] == len(load_tokenizer(tok_dir))


def test_copy_source_errors(tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        build_tokenizer(TokenizerParams(source="copy", path=str(tmp_path / "nope")), tiny_world, tmp_path)
    with pytest.raises(InputError, match="tokenizer.path"):
        build_tokenizer(TokenizerParams(source="copy"), tiny_world, tmp_path)


def test_malformed_world_file_is_named(tiny_world: Path, tmp_path: Path) -> None:
    broken = tmp_path / "world"
    shutil.copytree(tiny_world, broken, ignore=shutil.ignore_patterns("images"))
    (broken / "nlvr2/train.json").write_text("[{\"sent\": ")
    with pytest.raises(InputError, match=r"nlvr2/train.json.*malformed JSON"):
        list(training_corpus(broken))
