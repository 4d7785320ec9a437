"""Tokenizing documents in-process or in a pool of worker processes, in source order whatever the pool size;
shared by the whole-split cache and the sampled cache. Also the block-wise file hash both use."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .sources import read_file_documents


@dataclass
class Piece:
    """One unit of tokenizer output, in source order: a document, a skipped file, or an empty row."""

    tokens: np.ndarray | None = None  # a document's ids, EOT appended
    skipped: tuple[str, str] | None = None  # (file, reason)


class DocumentTokenizer:
    """Tokenizes documents into arrays of the cache dtype with EOT appended.

    Picklable (it holds the HF tokenizer), so each Pool worker gets its own copy once, at start-up.
    """

    def __init__(self, tokenizer: Any, eot_id: int, dtype: np.dtype, root: Path | None):
        self.tokenizer = tokenizer
        self.eot_id = eot_id
        self.dtype = dtype
        self.root = root

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of each text plus EOT. Literal "<|endoftext|>" inside a text stays text, like GPT-2's
        ``encode_ordinary`` used to prepare openwebtext, so EOT ids mark document boundaries only."""
        if not texts:
            return []
        ids = self.tokenizer(
            texts,
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]
        arrays = []
        for row in ids:
            array = np.empty(len(row) + 1, dtype=self.dtype)
            array[:-1] = row  # numpy raises OverflowError if an id does not fit the dtype
            array[-1] = self.eot_id
            arrays.append(array)
        return arrays

    def texts_task(self, texts: list[str | None]) -> list[Piece]:
        arrays = iter(self.encode([t for t in texts if t]))
        return [Piece(tokens=next(arrays)) if t else Piece() for t in texts]

    def files_task(self, paths: list[Path]) -> list[Piece]:
        pieces = []
        for path in paths:
            docs = read_file_documents(path)
            if docs.skip_reason is not None:
                shown = path.relative_to(self.root).as_posix() if self.root else str(path)
                pieces.append(Piece(skipped=(shown, docs.skip_reason)))
                continue
            pieces.extend(Piece(tokens=array) for array in self.encode(docs.documents))
            pieces.extend(Piece() for _ in range(docs.empty_documents))
        return pieces


_WORKER: DocumentTokenizer | None = None


def _init_worker(doc_tokenizer: DocumentTokenizer) -> None:
    global _WORKER
    _WORKER = doc_tokenizer


def _run_worker_task(method: str, task: list[Any]) -> list[Piece]:
    assert _WORKER is not None, "worker used before _init_worker"
    return getattr(_WORKER, method)(task)


@contextlib.contextmanager
def _env_override(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def run_tasks(
    doc_tokenizer: DocumentTokenizer, method: str, tasks: Iterable[list[Any]], num_proc: int
) -> Iterator[tuple[int, list[Piece]]]:
    """(task size, pieces) per task, in task order, so the output never depends on ``num_proc``.

    At most ``2 * num_proc`` tasks are in flight: a streaming source is never read far ahead of the
    tokenizer (``Pool.imap`` would drain it into memory), and stopping early at a limit wastes little work.
    """
    if num_proc <= 1:
        for task in tasks:
            yield len(task), getattr(doc_tokenizer, method)(task)
        return
    # Workers tokenize one batch each, single-threaded; setting this before they start also silences the
    # tokenizers fork warning when the parent has already used its thread pool.
    with _env_override("TOKENIZERS_PARALLELISM", "false"):
        pool = multiprocessing.get_context().Pool(num_proc, _init_worker, (doc_tokenizer,))
    with pool:  # leaving the block (also on early stop or error) terminates the workers
        pending: deque[tuple[int, Any]] = deque()
        for task in tasks:
            pending.append((len(task), pool.apply_async(_run_worker_task, (method, task))))
            if len(pending) >= 2 * num_proc:
                size, result = pending.popleft()
                yield size, result.get()
        while pending:
            size, result = pending.popleft()
            yield size, result.get()


def hash_into(digest: Any, handle: BinaryIO) -> Any:
    """Feed the rest of an open file to `digest` in 4 MiB blocks; returns the digest."""
    for block in iter(lambda: handle.read(2**22), b""):
        digest.update(block)
    return digest
