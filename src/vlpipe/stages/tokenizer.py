"""Stage `tokenizer`: WordPiece vocab trained on the world's training text, or a copy of
a user's local tokenizer directory (reads params section `tokenizer`)."""

from __future__ import annotations

from pathlib import Path

from vlpipe.config import load_section
from vlpipe.io import atomic_dir, write_metrics

TOKENIZER_DIR = Path("data/tokenizer")


def run(params_path: Path, root: Path) -> None:
    from vlpipe.data.tokenizer import build_tokenizer

    params = load_section("tokenizer", params_path)
    with atomic_dir(root / TOKENIZER_DIR) as tmp:
        metrics = build_tokenizer(params, root / "data/world", tmp)
    write_metrics(root / "metrics/tokenizer.json", metrics)
