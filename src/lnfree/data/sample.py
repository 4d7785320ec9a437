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

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..jsonfile import atomic_write
from .pool import hash_into, run_tasks
from .sources import (
    MANIFEST_FILE,
    ROW_SUFFIXES,
    TOKENS_FILE,
    DataSourceError,
    _hub_column,
    _load_hub_dataset,
    _Source,
    read_file_documents,
)

# Documents handed to the tokenizer workers per task, and the permutation's seed salt (a sampled cache's order
# must not coincide with a run's sequence order, which is seeded by the same small integers).
_UNITS_PER_TASK = 256
_SALT = 0x5A4D504C


class NotSampleable(Exception):
    """The source has no random access to its documents (streaming or pre-tokenized hub data)."""


class DocumentIndex:
    """Random access to the documents of one split of a resolved source, by index in a fixed order."""

    def __init__(self, resolved: _Source, split: str, num_proc: int):
        self.dataset = None
        self.rows: dict[int, list[str]] = {}  # row files, parsed once
        self.units: list[tuple[int, int]] = []  # (file index, row index or -1 for a one-document text file)
        if resolved.kind == "files":
            self.files = resolved.files
            for f, path in enumerate(self.files):
                if path.suffix.lower() in ROW_SUFFIXES:
                    self.rows[f] = read_file_documents(path).documents
                    self.units += [(f, r) for r in range(len(self.rows[f]))]
                else:
                    self.units.append((f, -1))
            self.n = len(self.units)
        else:
            dataset = _load_hub_dataset(resolved.hub, split, num_proc)
            if not hasattr(dataset, "__len__") or _hub_column(dataset, resolved.hub) != "text":
                raise NotSampleable(resolved.ident)
            self.dataset = dataset.select_columns(["text"])
            self.n = len(self.dataset)

    def __len__(self) -> int:
        return self.n

    def texts(self, indices: np.ndarray) -> list[str]:
        """The documents at `indices`, in that order ("" for an empty or unreadable one)."""
        if self.dataset is not None:
            return [t or "" for t in self.dataset[indices.tolist()]["text"]]
        out = []
        for i in indices.tolist():
            f, r = self.units[i]
            if r >= 0:
                out.append(self.rows[f][r])
            else:
                docs = read_file_documents(self.files[f])
                out.append(docs.documents[0] if docs.documents else "")
        return out


def permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([_SALT, seed]).permutation(n)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive use of a cache folder while it is built or extended (two runs starting together wait). A folder
    made here whose build failed before writing anything (a source that cannot be read) is removed again."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        except BaseException:
            if created and [p.name for p in folder.iterdir()] == [".lock"]:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_or_extend(resolved: _Source, doc_tokenizer: Any, source: str, split: str, folder: Path, need: int,
                    seed: int, manifest: dict | None, base_manifest: dict, num_proc: int, progress: bool) -> dict:
    """Grow the sampled cache in `folder` (holding `manifest`, or nothing) until it covers `need` tokens or the
    split is exhausted; returns the new manifest (written last, atomically, by the caller)."""

    index = DocumentIndex(resolved, split, num_proc)
    if manifest is not None and manifest["sample"]["n_units"] != len(index):
        manifest = None  # the split changed under the cache: start it again
    have = int(manifest["token_count"]) if manifest else 0
    start = int(manifest["sample"]["units_read"]) if manifest else 0
    itemsize = doc_tokenizer.dtype.itemsize
    order = permutation(len(index), seed)
    if progress:
        print(f"tokenizing a seeded sample of {source}:{split} ({len(index):,} documents) to {need:,} tokens "
              f"(holds {have:,}) in {folder} (~{need * itemsize / 1e6:,.0f} MB)", file=sys.stderr, flush=True)
    tasks = (index.texts(order[k : k + _UNITS_PER_TASK]) for k in range(start, len(index), _UNITS_PER_TASK))
    chunks = run_tasks(doc_tokenizer, "texts_task", tasks, num_proc)
    path = folder / TOKENS_FILE
    digest = hashlib.sha256()
    mode = "r+b" if have else "wb"
    count, units, documents, empty = have, start, 0, 0
    bar = tqdm(total=need, initial=min(have, need), unit="tok", unit_scale=True, disable=not progress,
               desc=f"tokenizing {source}:{split} (sample)")
    with contextlib.closing(chunks), bar, open(path, mode) as out:
        if have:  # the tokens already there stay as they are: hash them, then append after them
            out.truncate(have * itemsize)
            hash_into(digest, out)
        for _, pieces in chunks:
            for piece in pieces:
                units += 1
                if piece.tokens is None:
                    empty += 1
                else:
                    data = piece.tokens.tobytes()
                    out.write(data)
                    digest.update(data)
                    count += len(piece.tokens)
                    documents += 1
                if count >= need:
                    break
            bar.update(min(count, need) - bar.n)
            if count >= need:
                break
        out.flush()
        os.fsync(out.fileno())
    if count == 0:
        raise DataSourceError(f"no usable documents in {source!r} split {split!r}: every document read was empty, "
                              "binary or not UTF-8 text; give UTF-8 text files (or a dataset with a text column)")
    previous = manifest["sample"] if manifest else {"documents": 0, "empty_documents": 0}
    return {**base_manifest, "token_count": count, "tokens_sha256": digest.hexdigest(),
            "n_documents": previous["documents"] + documents,
            "sample": {"seed": seed, "n_units": len(index), "units_read": units,
                       "documents": previous["documents"] + documents,
                       "empty_documents": previous["empty_documents"] + empty,
                       "exhausted": units >= len(index)}}


def covers(manifest: dict | None, need: int) -> bool:
    """Whether a sampled cache already holds `need` tokens (or all there is)."""
    return manifest is not None and (manifest["token_count"] >= need or manifest["sample"]["exhausted"])


def write_manifest(folder: Path, manifest: dict) -> None:

    atomic_write(folder / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
