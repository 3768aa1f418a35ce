"""Readers and writers of the reference formats (../shared/docs/formats.md).

One module per format: :mod:`.lxmert` (pre-training JSON), :mod:`.vqa`, :mod:`.gqa`,
:mod:`.nlvr2` (LXMERT's task JSON), :mod:`.karpathy` (``dataset_coco.json``),
:mod:`.coco_captions` (COCO caption ground truth / results), :mod:`.retrieval` and
:mod:`.refcoco` (X-VLM). Every reader checks the exact keys and types of each record and
raises :class:`vlpipe.errors.InputError` naming the file and the record; every writer checks
records against the same schema and writes atomically. Shared checks live in :mod:`.schema`.
"""
