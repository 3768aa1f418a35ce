"""A BERT-style WordPiece tokenizer for the world's text (the role of LXMERT's
bert-base-uncased vocab at our scale).

``build_tokenizer`` either trains a WordPiece vocab on the training-split text with HF
``tokenizers`` or copies a user-provided local tokenizer directory. Either way the output
loads with ``transformers.BertTokenizerFast.from_pretrained(dir)`` and carries a
``meta.json`` with ``vocab_size`` and the special-token ids that models read.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpipe.config import TokenizerParams
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Training-split files and how to pull sentences out of each (reference formats).
_TEXT_SOURCES = ("lxmert/train.json", "nlvr2/train.json", "refcoco/train.json", "retrieval/train.json")


def training_corpus(world_dir: Path) -> Iterator[str]:
    """Yield every training-split sentence of the world, in a fixed order.

    Only train files are read: the tokenizer must not see val/test text.
    """
    for rel in _TEXT_SOURCES:
        path = world_dir / rel
        records = read_json(path)
        if not isinstance(records, list):
            raise InputError(path, f"expected a JSON list of records, got {type(records).__name__}")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise InputError(path, f"record {i} is not an object")
            yield from _sentences(rec, path, i)


def _sentences(rec: dict[str, Any], path: Path, i: int) -> Iterator[str]:
    if "sentf" in rec:  # LXMERT pre-training: {source: [sentences]}
        for source in sorted(rec["sentf"]):
            yield from rec["sentf"][source]
    elif "sent" in rec:  # NLVR2
        yield rec["sent"]
    elif "text" in rec:  # RefCOCO
        yield rec["text"]
    elif "caption" in rec:  # retrieval train
        cap = rec["caption"]
        yield from ([cap] if isinstance(cap, str) else cap)
    else:
        raise InputError(path, f"record {i} has no text field (sentf/sent/text/caption)")


def wordpiece_vocab(corpus: list[str], vocab_size: int, min_frequency: int, lowercase: bool) -> list[str]:
    """A deterministic WordPiece vocabulary: special tokens, every character (as a word start
    and as a ``##`` continuation), then whole words by frequency (ties alphabetical).

    Text is normalised and split exactly as BERT does (HF ``tokenizers``' BertNormalizer and
    BertPreTokenizer). We do not use the library's WordPiece *trainer*: its merges break ties
    in hash-map order, so the same corpus gives a different vocab from run to run, which
    would break the pipeline's bitwise reproducibility. Characters guarantee that every word
    of the corpus can be spelled, so nothing becomes [UNK].
    """
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm = BertNormalizer(lowercase=lowercase, strip_accents=lowercase, clean_text=True, handle_chinese_chars=True)
    pre = BertPreTokenizer()
    words: Counter[str] = Counter()
    for sent in corpus:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(sent)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    budget = max(vocab_size - len(vocab), 0)
    ranked = sorted((w for w, c in words.items() if c >= min_frequency and len(w) > 1), key=lambda w: (-words[w], w))
    return vocab + ranked[:budget]


def build_tokenizer(params: TokenizerParams, world_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write a BertTokenizerFast-loadable tokenizer to ``out_dir``; return stage metrics."""
    from transformers import BertTokenizerFast

    if params.source == "copy":
        if params.path is None:
            raise InputError("params.yaml", "tokenizer.path must be set when tokenizer.source is 'copy'")
        src = Path(params.path)
        if not src.is_dir():
            raise InputError(src, "tokenizer directory not found")
        shutil.copytree(src, out_dir, dirs_exist_ok=True)
        try:
            tok = BertTokenizerFast.from_pretrained(str(out_dir))
        except (OSError, ValueError) as e:
            raise InputError(src, f"not a BERT tokenizer directory: {e}") from e
        n_sentences = 0
    else:
        corpus = list(training_corpus(world_dir))
        n_sentences = len(corpus)
        vocab = wordpiece_vocab(corpus, params.vocab_size, params.min_frequency, params.lowercase)
        (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
        # transformers 5 ignores a vocab_file passed to the constructor: load the directory.
        tok = BertTokenizerFast.from_pretrained(str(out_dir), do_lower_case=params.lowercase)
        tok.save_pretrained(str(out_dir))  # tokenizer.json + tokenizer_config.json

    meta = {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "mask_token_id": tok.mask_token_id,
        "unk_token_id": tok.unk_token_id,
        "source": params.source,
    }
    write_json(out_dir / "meta.json", meta)
    metrics: dict[str, Any] = {"vocab_size": len(tok), "train_sentences": n_sentences}
    if n_sentences:
        corpus_sample = corpus[: min(len(corpus), 2000)]
        n_unk = sum(tok(s)["input_ids"].count(tok.unk_token_id) for s in corpus_sample)
        n_tok = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in corpus_sample)
        metrics["unk_rate"] = n_unk / max(n_tok, 1)
        metrics["tokens_per_sentence"] = n_tok / len(corpus_sample)
    return metrics


def load_tokenizer(tokenizer_dir: Path):
    """Load the stage's tokenizer (a ``BertTokenizerFast``), with a clear error if absent."""
    from transformers import BertTokenizerFast

    tokenizer_dir = Path(tokenizer_dir)
    if not any((tokenizer_dir / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise InputError(tokenizer_dir, "no tokenizer here (no vocab.txt or tokenizer.json); run `dvc repro tokenizer`")
    return BertTokenizerFast.from_pretrained(str(tokenizer_dir))
