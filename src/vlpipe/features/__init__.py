"""Visual features: the detector and its RoI ops, region/grid extraction, the feature store, the codebook.

Submodules are imported explicitly (``from vlpipe.features.detector import load_detector``) so
that importing one does not pull in the heavy dependencies of the others.
"""
