"""Data of the pipeline: the synthetic shapes world, reference-format readers/writers, tokenizer.

Submodules are imported explicitly (``from vlpipe.data.world import generate_world``) so that
importing one of them does not pull in OpenCV or torch for the others.
"""
