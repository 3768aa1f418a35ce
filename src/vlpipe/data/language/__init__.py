"""The language of the shapes world: questions, captions, NLVR2 statements, referring expressions.

:func:`write_text_data` turns the scene graphs of every split into all the text files of
``data/world`` (docs/layout.md) in the reference formats (formats.md §2, §4, §5), keeps the
test answers apart under ``hidden/``, and returns the text statistics of metrics/world.json.

Modules: :mod:`.scene` (what may be said about a scene: unique descriptions, counts,
relations), :mod:`.vqa`, :mod:`.gqa`, :mod:`.nlvr2`, :mod:`.captions`, :mod:`.refs` (one
generator per task), :mod:`.balance` (answer balancing), :mod:`.corpus` (generation over the
splits, seeds), :mod:`.records` (reference-format records), :mod:`.metrics` (statistics,
question-only baselines), :mod:`.writer` (the files).
"""

from vlpipe.data.language.writer import write_text_data

__all__ = ["write_text_data"]
