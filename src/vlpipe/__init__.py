"""vlpipe: a reproducible, DVC-managed pipeline for vision-language pre-training.

Rebuilds LXMERT, X-LXMERT, VLP and X-VLM on one code base. See README.md.
"""

__version__ = "0.1.0"
