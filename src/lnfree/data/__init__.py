"""Token caches and sequence sampling for LayerNorm-removal fine-tuning and evaluation.

Protocol (Heimersheim 2024; Baroni et al. 2025): every document is tokenized with the model's own tokenizer and
followed by one EOT token (``tok.eos_token_id``); the documents are concatenated into one stream, cut into
non-overlapping ``ctx``-token sequences with no BOS prepended (the incomplete tail is dropped). The loss is taken
within each sequence (ctx - 1 predictions); EOT is an ordinary token and target, so nothing here masks it.

The stream is stored once per (source, split, tokenizer, limits) as ``tokens.bin`` (little-endian uint16, or uint32
for vocabularies over 65536 ids) plus ``manifest.json``, written last, so a killed build never looks complete. The
bytes never depend on ``num_proc``. Sources (``sources.py``): ``stdlib`` (offline), local files and folders, hub
datasets, existing caches; local ones split train/val by a hash of each file's path (~3% val). A removal run
tokenizes only a seeded sample of documents that covers what it reads (``cache.py``).
"""

from __future__ import annotations

from .cache import TokenCache, TokenCacheMismatchError, build_token_cache, default_cache_root
from .sampler import SequenceSampler
from .sources import MANIFEST_FILE, DataSourceError, list_source_files, read_file_documents, stdlib_root

__all__ = ["MANIFEST_FILE", "DataSourceError", "SequenceSampler", "TokenCache", "TokenCacheMismatchError",
           "build_token_cache", "default_cache_root", "list_source_files", "read_file_documents", "stdlib_root"]
