"""Tokenizers for lnfree: train a small GPT-2-style BPE locally, load any tokenizer, fingerprint it.

Token caches (``lnfree.data``) store token ids, which only mean something together with the tokenizer
that produced them. ``tokenizer_fingerprint`` gives a short, stable identity for a tokenizer so a cache
made with one tokenizer is never silently used with another.

``train_bpe_tokenizer`` exists so that tests, benchmarks and offline experiments have a real tokenizer
without downloading one: it builds the same pipeline as GPT-2 (byte-level BPE, ``<|endoftext|>`` as the
only special token, serving as bos/eos/unk) and saves it so ``AutoTokenizer.from_pretrained`` loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is slow to import; only the functions that need it import it.
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOT_TOKEN = "<|endoftext|>"
# Byte-level BPE needs the 256 byte symbols plus the special token before any merge can be learned.
MIN_VOCAB_SIZE = 257
# Backend settings that the transformers wrapper rewrites on every call (tok(..., truncation=...)). They
# never change which ids a text maps to in an untruncated encode, so they must not change the fingerprint.
_VOLATILE_BACKEND_KEYS = ("truncation", "padding")


def train_bpe_tokenizer(
    texts: Iterable[str] | Iterable[str | os.PathLike[str]],
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer and save it to ``out_dir``.

    ``texts`` is either an iterable of document strings, or a list of file paths (``Path`` objects, or
    strings that all name existing files); files that are empty or not UTF-8 text are skipped. Training is
    deterministic for the same input. Returns the tokenizer as re-loaded from ``out_dir``, so it is
    exactly what a later ``AutoTokenizer.from_pretrained(out_dir)`` gives (same fingerprint).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}")
    backend = Tokenizer(models.BPE())
    # Same pipeline as GPT-2's tokenizer.json: no prefix space, byte-level decode, ids untouched on post.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        # Every byte is in the alphabet even if unseen, so any input can be encoded (no unk in practice).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_training_texts(texts), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) must give text back exactly
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return load_tokenizer(out)


def load_tokenizer(path_or_id: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer the ordinary way (``AutoTokenizer.from_pretrained``) with a one-line error.

    transformers' own errors are long and mention several unrelated causes; callers (the CLI) need one
    line that says what was tried and what to do about it.
    """
    from transformers import AutoTokenizer

    target = str(path_or_id)
    folder = Path(target).expanduser()
    vocab_files = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
    if folder.is_dir() and not any((folder / name).is_file() for name in vocab_files):
        # transformers would build a 1-token tokenizer from config.json alone, and training would then fail late
        raise ValueError(f"no tokenizer in {folder} (none of {', '.join(vocab_files)}); copy the model's tokenizer "
                         "files there, or pass a tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(target)
    except Exception as err:  # noqa: BLE001 - any failure becomes the same actionable message
        where = "local folder" if Path(target).exists() else "local folder or hub id"
        raise ValueError(
            f"could not load tokenizer from {where} {target!r} ({_first_line(err)}); pass a folder with "
            "tokenizer.json + tokenizer_config.json (e.g. made by lnfree.tokenizer.train_bpe_tokenizer), "
            "or a hub id that is in the local HF cache or reachable online"
        ) from err
    if len(tok) < 2:
        raise ValueError(f"the tokenizer in {target!r} has {len(tok)} token(s); pass the model's real tokenizer")
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """First 16 hex digits of the sha256 of the tokenizer's canonical JSON.

    Accepts a transformers fast tokenizer or a raw ``tokenizers.Tokenizer``. The JSON is re-serialized with
    sorted keys and without truncation/padding state, so the fingerprint depends only on what decides the
    token ids. Tokenizers without a Rust backend fall back to hashing class, vocabulary and special tokens.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None and hasattr(tok, "to_str"):
        backend = tok
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in _VOLATILE_BACKEND_KEYS:
            spec.pop(key, None)
    else:
        spec = {
            "class": type(tok).__name__,
            "vocab": sorted(tok.get_vocab().items()),
            "special_tokens": sorted(tok.all_special_tokens),
        }
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _training_texts(texts: Iterable[Any]) -> Iterator[str]:
    """Yield training strings, reading files when ``texts`` is a list of paths."""
    items = texts if isinstance(texts, list | tuple) else None
    if items is not None and items and _all_file_paths(items):
        for path in items:
            text = _read_text_file(Path(path))
            if text is not None:
                yield text
        return
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"expected str documents or a list of file paths, got {type(text).__name__}")
        yield text


def _all_file_paths(items: list[Any] | tuple[Any, ...]) -> bool:
    """Paths are recognised only when unambiguous: all PathLike, or all strings naming existing files."""
    if all(isinstance(item, os.PathLike) for item in items):
        return True
    return all(isinstance(item, str) and "\n" not in item and os.path.isfile(item) for item in items)


def _read_text_file(path: Path) -> str | None:
    """File content as text, or None for empty, binary (NUL bytes) or non-UTF-8 files."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def _first_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of message``, truncated, for embedding in a one-line error."""
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
