"""Token caches: ``build_token_cache`` writes ``tokens.bin`` + ``manifest.json``; ``TokenCache`` reads them.

A *whole* cache holds a split in stream order (cut at ``max_documents``/``max_tokens`` if asked), written to a temp
file that is moved into place once complete. A *sampled* cache (``need_tokens``) holds the documents of a seeded
random permutation of the split, in permutation order, up to the first at which they cover the need: a uniform
sample of documents, so its sequences are distributed like the whole split's. It grows by continuing the
permutation (appending: the tokens already there never change), so what it holds at N tokens is the same whatever
its history; a run reads only the prefix that covers its own need (``SequenceSampler(window=...)``), so its data
order is a function of (source, seed, need): an LN-free run and its control agree, and a resume is exact after
another run grew the cache. Sampling needs random access to documents (local files, non-streaming hub datasets such
as OpenWebText); a streaming or pre-tokenized hub dataset is read as a prefix instead. Both kinds are tokenized by
``writer.py``; the manifest, written last, is what marks either complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from lnfree.jsonfile import atomic_write, read_json
from lnfree.tokenizer import tokenizer_fingerprint

from .sources import MANIFEST_FILE, TOKENS_FILE, DataSourceError, _indexed, _resolve_source, _rows, _slug, _Source
from .writer import FIRST_BLOCK, Stats, pretokenized, sha256_rest, tokenized, write

CACHE_FORMAT, CACHE_FORMAT_VERSION = "lnfree-token-cache", 1
# A cache this small is checked against its sha256 at every open (well under a second); a larger one only has
# each batch's ids checked against the vocabulary as they are read (SequenceSampler), which catches what would
# crash the embedding, not an in-range corruption.
VERIFY_HASH_BYTES = 64 * 2**20
# The permutation's seed salt: a sampled cache's order must not coincide with a run's sequence order, which is
# seeded by the same small integers.
_SALT = 0x5A4D504C


class TokenCacheMismatchError(ValueError):
    """An existing token cache was made with a different tokenizer (or split) than the one requested."""


def default_cache_root() -> Path:
    """``$LNFREE_CACHE`` if set, else ``~/.cache/lnfree/tokens``."""
    env = os.environ.get("LNFREE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lnfree" / "tokens"


class TokenCache:
    """A built token stream: ``tokens`` (read-only memmap) and ``manifest`` (dict), cut into sequences."""

    def __init__(self, path: Path, manifest: dict[str, Any], tokens: np.memmap):
        self.path, self.manifest, self.tokens = path, manifest, tokens
        self.fingerprint, self.eot_id = manifest["tokenizer_fingerprint"], int(manifest["eot_id"])
        self.token_count = int(manifest["token_count"])
        self.data_id = int(manifest["tokens_sha256"][:12], 16)  # the exact stream, as a JSON-friendly 48-bit int
        self._prefix_ids: dict[int, int] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], tokenizer: Any = None) -> TokenCache:
        """Open a complete cache folder; with ``tokenizer``, refuse one built with a different tokenizer."""
        folder = Path(path)
        manifest = _read_valid_manifest(folder)
        if manifest is None:
            raise DataSourceError(f"{folder} is not a complete lnfree token cache (no valid {MANIFEST_FILE})")
        shape, dtype = (int(manifest["token_count"]),), np.dtype(manifest["dtype"]).newbyteorder("<")
        cache = cls(folder, manifest, np.memmap(folder / TOKENS_FILE, dtype, "r", shape=shape))
        if tokenizer is not None:
            cache.check_tokenizer(tokenizer)
        return cache

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``TokenCacheMismatchError`` unless ``tokenizer`` is the one the cache was built with."""
        requested = tokenizer_fingerprint(tokenizer)
        if requested != self.fingerprint:
            raise TokenCacheMismatchError(
                f"token cache {self.path} was built with tokenizer {self.fingerprint}, but the requested "
                f"tokenizer is {requested}; use the model's matching tokenizer or build a new cache for it")
        if tokenizer.eos_token_id != self.eot_id:
            raise TokenCacheMismatchError(
                f"token cache {self.path} uses EOT id {self.eot_id}, but the requested tokenizer's "
                f"eos_token_id is {tokenizer.eos_token_id}; build a new cache for this tokenizer")

    def prefix_id(self, n_tokens: int) -> int:
        """Like ``data_id``, for the first ``n_tokens`` tokens only (hashed once per cache object: ~1 s per GB)."""
        if n_tokens not in self._prefix_ids:
            digest = hashlib.sha256(np.asarray(self.tokens[:n_tokens]).tobytes()).hexdigest()
            self._prefix_ids[n_tokens] = int(digest[:12], 16)
        return self._prefix_ids[n_tokens]

    def n_sequences(self, ctx: int) -> int:
        """Number of complete, non-overlapping ``ctx``-token sequences (the incomplete tail is dropped)."""
        if ctx < 1:
            raise ValueError(f"ctx must be positive, got {ctx}")
        return self.token_count // ctx

    def sequence(self, i: int, ctx: int) -> np.ndarray:
        """Sequence ``i`` as int64 ids: tokens ``[i*ctx, (i+1)*ctx)`` of the stream, no BOS added."""
        if not 0 <= i < (n := self.n_sequences(ctx)):
            raise IndexError(f"sequence {i} out of range: the cache has {n} sequences of ctx={ctx}")
        return np.asarray(self.tokens[i * ctx : (i + 1) * ctx], dtype=np.int64)


def build_token_cache(source: str, tokenizer: Any, split: str = "train", cache_root: str | os.PathLike | None = None,
                      max_documents: int | None = None, max_tokens: int | None = None, num_proc: int | None = None,
                      progress: bool = True, need_tokens: int | None = None, sample_seed: int = 0) -> TokenCache:
    """Tokenize ``source``/``split`` with ``tokenizer`` into a token cache, or return the existing one.

    ``max_documents`` keeps the first N non-empty documents (rows for hub and pre-tokenized data);
    ``max_tokens`` cuts the stream to exactly N tokens. ``need_tokens`` instead makes (or grows) a *sampled*
    cache: a ``sample_seed``-ed random subset of documents covering at least that many tokens. ``num_proc``
    (default: CPU count, at most 8) only changes speed, never the bytes written. ``source`` may also be an
    existing cache folder, which is reused after checking that it was made with ``tokenizer`` and holds ``split``.
    """
    for name, value in (("max_documents", max_documents), ("max_tokens", max_tokens), ("need_tokens", need_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    resolved = _resolve_source(source, split)
    if resolved.kind == "cache":
        if max_documents is not None or max_tokens is not None:
            raise ValueError(f"{resolved.root} is an existing token cache; max_documents/max_tokens cannot be "
                             "applied to it")
        cache = TokenCache.open(resolved.root, tokenizer)
        if cache.manifest["split"] != split:
            raise TokenCacheMismatchError(
                f"token cache {resolved.root} holds split {cache.manifest['split']!r}, not the requested {split!r}; "
                f"pass split={cache.manifest['split']!r} or the matching cache")
        return cache
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token to use as EOT")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    job = _Job(resolved, tokenizer, source, split, num_proc if num_proc is not None else min(8, cpus), progress)
    if need_tokens is not None:
        if max_documents is not None or max_tokens is not None:
            raise ValueError("need_tokens (a sampled cache) cannot be combined with max_documents/max_tokens")
        sampled = _sampled_cache(job, cache_root, need_tokens, sample_seed)
        if sampled is not None:
            return sampled
        max_tokens = need_tokens  # no random access to documents (streaming hub data): read a prefix instead
    key, folder = job.key(cache_root, "", max_documents=max_documents, max_tokens=max_tokens)
    if _read_valid_manifest(folder) is None:
        manifest = _build(job, folder, max_documents, max_tokens)
        atomic_write(folder / MANIFEST_FILE, json.dumps({**manifest, **key}, indent=2, sort_keys=True) + "\n")
    return TokenCache.open(folder, tokenizer)


@dataclass
class _Job:
    """What one ``build_token_cache`` call tokenizes, and how."""

    resolved: _Source
    tokenizer: Any
    source: str
    split: str
    num_proc: int
    progress: bool

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u2") if len(self.tokenizer) <= 2**16 else np.dtype("<u4")

    def key(self, cache_root: Any, tag: str, **limits: Any) -> tuple[dict[str, Any], Path]:
        """The manifest's key fields and the cache folder they name."""
        key = {"format_version": CACHE_FORMAT_VERSION, "source": self.resolved.ident, "split": self.split,
               "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
               # eos_token lives in tokenizer_config.json, outside the backend JSON the fingerprint hashes.
               "eot_id": self.tokenizer.eos_token_id, **limits, "content_signature": self.resolved.signature}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
        folder = root / f"{self.resolved.slug}-{_slug(self.split)}{tag}-{digest}"
        return {"tokenizer_fingerprint": key["tokenizer_fingerprint"], "cache_key": key,
                "cache_key_digest": digest}, folder

    def manifest(self, stats: Stats, sha: str, **fields: Any) -> dict[str, Any]:
        """The manifest of a cache that holds ``stats``' tokens; raises when it holds none."""
        if stats.tokens == 0:
            examples = ", ".join(stats.skipped[:3])
            raise DataSourceError(f"no usable documents in {self.source!r} split {self.split!r}: {len(stats.skipped)} "
                                  f"files skipped as empty/binary/non-UTF-8{': ' + examples if examples else ''}, "
                                  f"{stats.empty} empty rows; give UTF-8 text (or a dataset with a text column)")
        return {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "source": self.source,
                "source_resolved": self.resolved.ident, "split": self.split,
                "tokenizer_name": str(getattr(self.tokenizer, "name_or_path", "")), "vocab_size": len(self.tokenizer),
                "eot_id": int(self.tokenizer.eos_token_id), "dtype": self.dtype.name, "byteorder": "little",
                "token_count": stats.tokens, "tokens_sha256": sha, "n_documents": stats.documents, **fields}

    def bar(self, total: int | None, initial: int = 0, what: str = "") -> Any:
        return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, disable=not self.progress,
                    desc=f"tokenizing {self.source}:{self.split}{what}")


def _sampled_cache(job: _Job, cache_root: Any, need: int, seed: int) -> TokenCache | None:
    """The sampled cache of ``job``'s source, split and tokenizer with ``seed``, grown to cover ``need``
    tokens; None when the source has no random access to its documents. Runs that build or grow one cache together
    take turns through a lock in its folder."""
    key, folder = job.key(cache_root, f"-sample{seed}", sample_seed=seed)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    cache = None
    try:
        with FileLock(folder / ".lock"):  # two runs starting together: one builds or grows it, the other waits
            manifest = _read_valid_manifest(folder)
            if manifest is None or not (manifest["token_count"] >= need or manifest["sample"]["exhausted"]):
                index = _indexed(job.resolved, job.split, job.num_proc)
                if index is None:
                    return None
                manifest = _grow(job, folder, manifest, index, need, seed, key)
                atomic_write(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            cache = TokenCache.open(folder, job.tokenizer)  # under the lock: another run may append later
    finally:  # a folder made here that holds nothing (a source that cannot be read or sampled) goes again
        if cache is None and created and [p.name for p in folder.iterdir()] == [".lock"]:
            shutil.rmtree(folder, ignore_errors=True)
    return cache


def _grow(job: _Job, folder: Path, manifest: dict | None, index: tuple, need: int, seed: int, key: dict) -> dict:
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
        sha = write(out, sha256_rest(out), tokenized(rows, job.tokenizer, job.dtype, job.num_proc), stats, bar,
                    max_tokens=need, cut=False)
    return job.manifest(stats, sha, pretokenized=False, max_documents=None, max_tokens=None, **key,
                        sample={"seed": seed, "n_units": n, "units_read": stats.rows, "documents": stats.documents,
                                "empty_documents": stats.empty, "exhausted": stats.rows >= n})


def _build(job: _Job, folder: Path, max_documents: int | None, max_tokens: int | None) -> dict[str, Any]:
    """Write a whole cache's ``tokens.bin`` (a temp file moved into place once complete) and return its manifest
    without the key fields: the caller adds them and writes it last, which is what marks the cache complete."""
    # Open the source before touching the cache folder: an unreadable source (hub offline) leaves nothing.
    column, rows = _rows(job.resolved, job.split, job.num_proc)
    if column == "text":
        blocks = tokenized(rows, job.tokenizer, job.dtype, job.num_proc)
    else:
        spec, vocab = job.resolved.hub, len(job.tokenizer)
        if spec.expected_vocab is not None and vocab != spec.expected_vocab:
            raise DataSourceError(f"{spec.repo!r} holds ids from a {spec.expected_vocab}-token vocabulary (GPT-2) "
                                  f"but the tokenizer has {vocab}; pass the gpt2 tokenizer")
        blocks = pretokenized(rows, vocab, spec.repo, job.dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)  # an invalid old manifest must not outlive new tokens
    tmp = folder / f"{TOKENS_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    stats = Stats()
    try:
        with open(tmp, "wb") as out, job.bar(max_tokens) as bar:
            sha = write(out, hashlib.sha256(), blocks, stats, bar, max_documents, max_tokens)
        if stats.tokens:
            os.replace(tmp, folder / TOKENS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when the build failed before anything was kept
    return job.manifest(stats, sha, empty_documents=stats.empty, skipped_files=len(stats.skipped),
                        skipped_examples=stats.skipped[:20], pretokenized=column != "text",
                        max_documents=max_documents, max_tokens=max_tokens)


def _read_valid_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest if ``folder`` holds a complete, intact cache of this format, else None (rebuild it)."""
    try:
        manifest = read_json(folder / MANIFEST_FILE)
        size = (folder / TOKENS_FILE).stat().st_size
        complete = (manifest.get("format") == CACHE_FORMAT and manifest.get("format_version") == CACHE_FORMAT_VERSION
                    and size == int(manifest["token_count"]) * np.dtype(manifest["dtype"]).itemsize)
        if complete and size <= VERIFY_HASH_BYTES:
            with open(folder / TOKENS_FILE, "rb") as handle:
                complete = sha256_rest(handle).hexdigest() == manifest["tokens_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if complete else None
