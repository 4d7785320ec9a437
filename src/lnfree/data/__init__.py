"""Token caches and sequence sampling for LayerNorm-removal fine-tuning and evaluation.

Protocol (Heimersheim 2024; Baroni et al. 2025): every document is tokenized with the model's own tokenizer,
followed by one EOT token (``tok.eos_token_id``); documents are concatenated into one flat stream, which is
cut into non-overlapping ``ctx``-token sequences with no BOS prepended (the last incomplete one is dropped).
The loss is computed within each sequence (ctx - 1 predictions); EOT is an ordinary token and target, so
nothing here masks it.

The stream is stored once per (source, split, tokenizer, limits) as ``tokens.bin`` (flat little-endian
uint16, or uint32 for vocabularies over 65536 ids) plus ``manifest.json``. The manifest is written last and
both files are moved into place with ``os.replace``, so a killed build never looks complete. Building is
deterministic: the same inputs give a byte-identical ``tokens.bin`` whatever ``num_proc`` is.

Sources (one string):
  * ``stdlib``: the ``.py`` files of the running interpreter's standard library (works offline);
  * a local file or folder of ``.txt``/``.py``/``.md`` (one document per file), ``.jsonl`` (field ``text``)
    or ``.parquet`` (column ``text``);
  * a hub dataset: ``openwebtext``, ``pile``, ``pile-filtered``, the pre-tokenized
    ``apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2``, or any ``owner/name``;
  * an existing token-cache folder (reused as is after checking its tokenizer fingerprint).
Local sources and ``stdlib`` are split into train/val by file (a hash of the path picks ~3% for val), so
the split never depends on which other files exist.

A removal run does not tokenize a whole training split: ``build_token_cache(..., need_tokens=N)`` makes or grows a
*sampled* cache — a seeded random sample of documents covering N tokens (``lnfree.data.cache``) — and the run
reads its first N tokens (``SequenceSampler(window=...)``). Validation splits are always tokenized in full.
"""

from __future__ import annotations

from .cache import TokenCache, TokenCacheMismatchError, build_token_cache, default_cache_root
from .sampler import SequenceSampler
from .sources import MANIFEST_FILE, DataSourceError, list_source_files, read_file_documents, stdlib_root

__all__ = ["MANIFEST_FILE", "DataSourceError", "SequenceSampler", "TokenCache", "TokenCacheMismatchError",
           "build_token_cache", "default_cache_root", "list_source_files", "read_file_documents", "stdlib_root"]
