"""Sampled token caches: a run tokenizes what it will read, not the whole split.

A fine-tuning run reads a known number of tokens (steps × batch tokens + calibration): for baroni2025 on GPT-2
small, 157M of OpenWebText's ~9B. A *sampled* cache holds the documents of a seeded random permutation of the
split, in permutation order, up to the first one at which the stream covers the need — a uniform random sample of
documents, so the sequences cut from it are distributed like sequences of the whole split. It records how many
documents of the permutation it holds and grows by continuing the permutation: a run that needs more extends it
(appending; the tokens already there never change), a run that needs less reads its prefix. What a cache holds
after reaching N tokens is the same whatever its history, and a run reads only the prefix that covers its own
need (`SequenceSampler(window=...)`), so its data order is a function of (source, seed, need) — an LN-free run
and its control agree, and a resume is exact even after another run extended the cache.

Sampling needs random access to documents: local files (a text file is one document, a .jsonl/.parquet row is
one) and non-streaming hub datasets such as OpenWebText (rows of its Arrow table, the nanoGPT val carve-out kept
apart). A streaming or pre-tokenized hub dataset is read as a prefix instead (`max_tokens`), as before.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .sources import TOKENS_FILE, DataSourceError
from .writer import FIRST_BLOCK, Stats, sha256_rest, tokenized, write

if TYPE_CHECKING:
    from .cache import _Job

# The permutation's seed salt: a sampled cache's order must not coincide with a run's sequence order, which is
# seeded by the same small integers.
_SALT = 0x5A4D504C


def grow(job: _Job, folder: Path, manifest: dict | None, index: tuple, need: int, seed: int, key: dict) -> dict:
    """Continue the permutation from where ``manifest`` stopped until the cache covers ``need`` tokens or the split
    is exhausted; returns the new manifest (written last, atomically, by the caller)."""
    n, texts = index
    if manifest is not None and manifest["sample"]["n_units"] != n:
        manifest = None  # the split changed under the cache: start it again
    sample = manifest["sample"] if manifest else {"units_read": 0, "documents": 0, "empty_documents": 0}
    stats = Stats(manifest["token_count"] if manifest else 0, sample["units_read"], sample["documents"],
                  sample["empty_documents"])
    have, order = stats.tokens, np.random.default_rng([_SALT, seed]).permutation(n)
    if job.progress:
        print(f"tokenizing a seeded sample of {job.source}:{job.split} ({n:,} documents) to {need:,} tokens "
              f"(holds {have:,}) in {folder} (~{need * job.dtype.itemsize / 1e6:,.0f} MB)", file=sys.stderr, flush=True)
    rows = ((text, None) for k in range(stats.rows, n, FIRST_BLOCK) for text in texts(order[k : k + FIRST_BLOCK]))
    bar = job.bar(need, min(have, need), " (sample)")
    with open(folder / TOKENS_FILE, "r+b" if have else "w+b") as out, bar:
        out.truncate(have * job.dtype.itemsize)  # the tokens already there stay: hash them, then append after them
        blocks = tokenized(rows, job.tokenizer, job.dtype, job.num_proc)
        sha = write(out, sha256_rest(out), blocks, stats, bar, max_tokens=need, cut=False)
    if stats.tokens == 0:
        raise DataSourceError(f"no usable documents in {job.source!r} split {job.split!r}: every document read was "
                              "empty, binary or not UTF-8 text; give UTF-8 text files (or a dataset with a text "
                              "column)")
    return job.manifest(pretokenized=False, max_documents=None, max_tokens=None, **key, token_count=stats.tokens,
                        tokens_sha256=sha, n_documents=stats.documents,
                        sample={"seed": seed, "n_units": n, "units_read": stats.rows, "documents": stats.documents,
                                "empty_documents": stats.empty, "exhausted": stats.rows >= n})
