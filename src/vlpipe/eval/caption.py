"""Captioning metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE (COCO caption evaluation).

:func:`caption_metrics` runs the official ``pycocoevalcap`` scorers (Chen et al. 2015, the
coco-caption code): Stanford PTB tokenization and METEOR run in Java; BLEU (Papineni et al.
2002), ROUGE-L (Lin 2004) and CIDEr-D (Vedantam et al. 2015; coco-caption's ``Cider`` *is*
CIDEr-D: clipped n-gram counts and a Gaussian length penalty, x10) in Python. SPICE
(Anderson et al. 2016) needs Stanford CoreNLP models, which pycocoevalcap downloads at first
use: here it runs only when they are already on disk, and is otherwise reported as skipped,
never as a number.

:class:`CiderD` is the same CIDEr-D for training rewards (SCST): document frequencies come
from a fixed reference corpus (the training captions), so a batch is scored without Java.

Metrics know no model: they take ``{image_id: caption}`` and ``{image_id: [references]}``.
"""

from __future__ import annotations

import math
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpipe.data.formats.coco_captions import read_caption_results
from vlpipe.data.formats.karpathy import tokenize
from vlpipe.errors import InputError

METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
SPICE_JARS: tuple[str, ...] = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
MAX_LISTED = 5


# ------------------------------------------------------------------------- results


def check_caption_results(
    path: str | Path, records: Sequence[Mapping[str, Any]], image_ids: Iterable[int]
) -> dict[int, str]:
    """``{image_id: caption}`` of results records checked against the ground truth's images.

    Raises :class:`InputError` naming ``path`` for an image id the ground truth lacks (a
    results file of another split, or a Karpathy ``imgid`` instead of the ``cocoid``), an image
    without a caption, or an empty caption.
    """
    wanted = set(image_ids)
    out: dict[int, str] = {}
    for i, rec in enumerate(records):
        image_id, caption = rec.get("image_id"), rec.get("caption")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise InputError(path, f"entry {i}: image_id must be an int, got {image_id!r}")
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(path, f"entry {i} (image_id {image_id}): missing or empty caption")
        if image_id not in wanted:
            raise InputError(path, f"entry {i}: image_id {image_id} is not an image of the ground truth")
        if image_id in out:
            raise InputError(path, f"entry {i}: duplicate image_id {image_id}")
        out[image_id] = caption
    missing = sorted(wanted - set(out))
    if missing:
        raise InputError(
            path, f"{len(missing)} of {len(wanted)} images have no caption, e.g. image_id {missing[:MAX_LISTED]}"
        )
    return out


def read_results(path: str | Path, image_ids: Iterable[int]) -> dict[int, str]:
    """Read a results file ``[{"image_id": int, "caption": str}]`` and check it (see above)."""
    return check_caption_results(path, read_caption_results(path), image_ids)


# ---------------------------------------------------------------------- pycocoevalcap


def spice_models_dir() -> Path:
    """Where pycocoevalcap's SPICE looks for the Stanford CoreNLP jars."""
    import pycocoevalcap.spice.spice as spice_module

    return Path(spice_module.__file__).parent / "lib"


def spice_available() -> bool:
    """SPICE runs offline only when the CoreNLP jars are already there."""
    lib = spice_models_dir()
    return all((lib / jar).is_file() for jar in SPICE_JARS)


def _ptb_tokenize(captions: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | str:
    if not spice_available():
        return f"skipped: Stanford CoreNLP models not found in {spice_models_dir()}"
    from pycocoevalcap.spice.spice import Spice

    try:
        return float(Spice().compute_score(gts, res)[0])
    except (subprocess.CalledProcessError, OSError) as e:
        return f"skipped: SPICE failed ({type(e).__name__}: {e})"


def caption_metrics(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    *,
    meteor: bool = True,
    spice: bool = True,
) -> dict[str, Any]:
    """Official COCO caption metrics of ``{image_id: caption}`` against ``{image_id: [refs]}``.

    Every reference image needs a prediction and vice versa (check files first with
    :func:`read_results`). Returns BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (coco-caption scale:
    CIDEr-D 1.169 is the 116.9 of papers), ``SPICE`` (a number, or a string saying why it was
    skipped) and ``images``. METEOR loads its paraphrase table in Java (~10-30 s), so the
    evaluations during training pass ``meteor=False`` (no METEOR key) and ``spice=False``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise ValueError("predictions and references must cover the same image ids")
    ids = sorted(references)
    gts = _ptb_tokenize({i: list(references[i]) for i in ids})
    res = _ptb_tokenize({i: [predictions[i]] for i in ids})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, Any] = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    if meteor:
        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    out["SPICE"] = _spice(gts, res) if spice else "skipped: disabled"
    out["images"] = len(ids)
    return out


# ---------------------------------------------------------------- CIDEr-D reward


def _ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams of a token list (coco-caption's ``precook``)."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D with document frequencies of a fixed reference corpus (for SCST rewards).

    Computes exactly coco-caption's ``CiderScorer`` (n = 4, sigma = 6, clipping, x10) except
    that the idf comes from ``corpus`` ({image: [reference captions]}) instead of from the
    images being scored; with ``corpus`` = the scored images' references the two agree.
    Captions are tokenized as Karpathy's files are (lowercase words, punctuation dropped).
    """

    def __init__(self, corpus: Mapping[Any, Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.doc_freq: Counter = Counter()
        for refs in corpus.values():
            self.doc_freq.update({g for ref in refs for g in _ngrams(tokenize(ref), n)})
        self.log_num_docs = math.log(float(len(corpus)))
        self._ref_cache: dict[Any, list[tuple[list[dict], list[float], int]]] = {}

    def _vector(self, words: Sequence[str]) -> tuple[list[dict], list[float], int]:
        """tf-idf vector per n-gram order, its norms and the length (coco-caption counts bigrams)."""
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in _ngrams(words, self.n).items():
            k = len(gram) - 1
            value = float(tf) * (self.log_num_docs - math.log(max(1.0, float(self.doc_freq[gram]))))
            vec[k][gram] = value
            norm[k] += value * value
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _similarity(self, hyp: tuple[list[dict], list[float], int], ref: tuple[list[dict], list[float], int]) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
        val = np.zeros(self.n)
        for k in range(self.n):
            val[k] = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= penalty
        return val

    def _refs(self, key: Any, refs: Sequence[str]) -> list[tuple[list[dict], list[float], int]]:
        if key not in self._ref_cache:
            self._ref_cache[key] = [self._vector(tokenize(r)) for r in refs]
        return self._ref_cache[key]

    def score(self, caption: str, refs: Sequence[str], key: Any = None) -> float:
        """CIDEr-D of one caption against its references (``key`` caches their vectors)."""
        ref_vecs = self._refs(key, refs) if key is not None else [self._vector(tokenize(r)) for r in refs]
        hyp = self._vector(tokenize(caption))
        total = sum((self._similarity(hyp, r) for r in ref_vecs), np.zeros(self.n))
        return float(np.mean(total) / len(ref_vecs) * 10.0)

    def scores(self, captions: Sequence[str], refs: Sequence[Sequence[str]], keys: Sequence[Any] | None = None) -> np.ndarray:
        """(B,) CIDEr-D of each caption against its own references."""
        keys = keys if keys is not None else [None] * len(captions)
        return np.array([self.score(c, r, k) for c, r, k in zip(captions, refs, keys, strict=True)])
