"""The one tokenizing writer behind whole and sampled token caches.

Rows of text are tokenized in blocks by ``datasets.Dataset.map(num_proc=...)``: it splits a block into contiguous
shards, one per worker process, and concatenates their results in shard order, so the ids — and ``tokens.bin`` —
never depend on ``num_proc``. Blocks start small and double, so a cache that stops early (``max_documents``,
``max_tokens``, a sampled cache's need) tokenizes little beyond what it keeps, while a whole split pays for worker
start-up only a few times. ``write`` then appends the blocks' ids to the open ``tokens.bin`` up to a limit.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sources import DataSourceError

# Rows per block (the first, and the cap it doubles to) and at least per worker process: a smaller block is
# tokenized in-process, as starting workers would cost more than it saves.
FIRST_BLOCK, _MAX_BLOCK, _ROWS_PER_PROC = 256, 16384, 64


def tokenized(rows: Iterator[tuple[str | None, str | None]], tokenizer: Any, dtype: np.dtype,
              num_proc: int) -> Iterator[tuple[Any, tuple]]:
    """(ids, skips) per block of (text, why a file was skipped) rows; ``ids`` is an Arrow list column holding each
    row's ids (none for an empty or skipped row)."""
    import datasets

    kwargs = {"tokenizer": tokenizer, "eot_id": int(tokenizer.eos_token_id), "dtype": dtype}
    for block in _blocks(rows):
        texts, skips = zip(*block, strict=True)
        procs = min(num_proc, len(block) // _ROWS_PER_PROC)
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # the cache's own bar counts tokens
        try:  # kept in memory, never in the HF cache; a fixed fingerprint spares hashing the tokenizer per block
            table = datasets.Dataset.from_dict({"text": list(texts)}).map(
                _encode, batched=True, num_proc=procs if procs > 1 else None, remove_columns=["text"],
                keep_in_memory=True, new_fingerprint="lnfree-tokens", fn_kwargs=kwargs).data
        finally:
            if not quiet:
                datasets.enable_progress_bars()
        yield table.column("ids"), skips


def _encode(batch: dict[str, list], tokenizer: Any, eot_id: int, dtype: np.dtype) -> dict[str, list]:
    """``Dataset.map`` function: each text's ids then EOT, none for an empty row. Literal "<|endoftext|>" inside a
    text stays text, like GPT-2's ``encode_ordinary`` used to prepare openwebtext, so EOT marks document ends only."""
    kept = [text for text in batch["text"] if text]
    ids = iter(tokenizer(kept, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                         verbose=False)["input_ids"] if kept else [])
    # np.array raises OverflowError if an id does not fit the dtype
    return {"ids": [np.array([*next(ids), eot_id], dtype) if text else np.empty(0, dtype) for text in batch["text"]]}


def _blocks(rows: Iterator[Any]) -> Iterator[list[Any]]:
    size = FIRST_BLOCK
    while block := list(itertools.islice(rows, size)):
        yield block
        size = min(2 * size, _MAX_BLOCK)


def pretokenized(rows: Iterator[list[int]], vocab_size: int, repo: str, dtype: np.dtype) -> Iterator[tuple]:
    """(ids, skips) per block of an already tokenized dataset's rows, kept as they are (they hold their EOTs)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for block in _blocks(rows):
        ids = pa.array(block, pa.list_(pa.int64()))
        values = pc.list_flatten(ids).to_numpy()
        if values.size and (values.min() < 0 or values.max() >= vocab_size):
            raise DataSourceError(f"{repo!r} has token id {int(values.max())} outside the tokenizer's {vocab_size} "
                                  "ids; pass the tokenizer the dataset was made with")
        yield ids.cast(pa.list_(pa.from_numpy_dtype(dtype))), (None,) * len(block)


@dataclass
class Stats:
    """What a cache holds so far: tokens, rows read (a sampled cache's documents of its permutation), documents,
    empty rows, and the files skipped ("name (why)")."""

    tokens: int = 0
    rows: int = 0
    documents: int = 0
    empty: int = 0
    skipped: list[str] = field(default_factory=list)


def write(out: Any, digest: Any, blocks: Iterator[tuple[Any, tuple]], stats: Stats, bar: Any,
          max_documents: int | None = None, max_tokens: int | None = None, cut: bool = True) -> str:
    """Append the blocks' documents to ``out`` in order until they run out or a limit is reached: after the document
    that makes ``max_documents``, or at ``max_tokens`` (inside that document with ``cut``, else after it). Updates
    ``stats``; returns the sha256 of everything in ``out`` (``digest`` holds what was there before)."""
    import pyarrow.compute as pc

    for ids, skips in blocks:
        lengths = pc.list_value_length(ids).fill_null(0).to_numpy()
        documents = stats.documents + np.cumsum(lengths > 0)
        tokens = stats.tokens + np.cumsum(lengths)
        done = (documents >= (max_documents or np.inf)) | (tokens >= (max_tokens or np.inf))
        n = int(np.argmax(done)) + 1 if done.any() else len(lengths)  # rows taken from this block
        end = min(int(tokens[n - 1]), max_tokens) if cut and max_tokens else int(tokens[n - 1])
        data = pc.list_flatten(ids).to_numpy()[: end - stats.tokens].tobytes()
        out.write(data)
        digest.update(data)
        skipped = [why for why in skips[:n] if why]
        stats.skipped += skipped
        stats.empty += n - int(documents[n - 1] - stats.documents) - len(skipped)
        stats.rows, stats.documents, stats.tokens = stats.rows + n, int(documents[n - 1]), end
        bar.update(min(end, bar.total or end) - bar.n)
        if done.any():
            break
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


def sha256_rest(handle: Any) -> Any:
    """sha256 of the rest of an open file, read in 4 MiB blocks (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(2**22), b""):
        digest.update(block)
    return digest
