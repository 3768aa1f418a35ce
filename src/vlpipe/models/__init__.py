"""Vision-language models (LXMERT, X-LXMERT, VLP, X-VLM) and reference-checkpoint conversion.

Models know no task, dataset or file format: they take tensors and return named outputs
and losses. Import the submodules directly (``vlpipe.models.lxmert``, ``vlpipe.models.convert``);
this package imports nothing heavy on its own.
"""
