"""Source resolution: ``stdlib``, local files and folders, hub datasets and existing token-cache folders.

Local sources are listed, split into train/val by file and read into documents here; hub datasets are
loaded (offline when the hub is unreachable) through ``datasets``. See ``lnfree.data`` for the protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sysconfig
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lnfree.tokenizer import _first_line

VAL_FRACTION = 0.03
SPLITS = ("train", "val", "all")
TEXT_SUFFIXES = (".txt", ".py", ".md")
ROW_SUFFIXES = (".jsonl", ".parquet")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
FOLDER_EXCLUDED_DIRS = frozenset({"__pycache__"})

# The token cache's file names, here because an existing cache folder is itself a valid source.
TOKENS_FILE = "tokens.bin"
MANIFEST_FILE = "manifest.json"

# nanoGPT's openwebtext split, used by both papers: val is 0.05% of the hub "train" split.
OPENWEBTEXT_VAL_FRACTION = 0.0005
OPENWEBTEXT_SPLIT_SEED = 2357

_HUB_BATCH_ROWS = 1000
_HUB_PROBE_TIMEOUT_S = 3.0
_OFFLINE_HINT = "offline sources that work: 'stdlib' or a local file/folder of .txt/.py/.md/.jsonl/.parquet"


class DataSourceError(RuntimeError):
    """A data source cannot be resolved or read; the message is one line that says what to do."""


# --------------------------------------------------------------------------------------------------------
# Files: discovery and train/val split
# --------------------------------------------------------------------------------------------------------


def split_of(relative_path: str) -> str:
    """``"val"`` for ~3% of paths, else ``"train"``, decided only by the path relative to its source root.

    Hashing the path (not shuffling a list) keeps a file in the same split when files are added or removed.
    """
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big") / 2**32
    return "val" if bucket < VAL_FRACTION else "train"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (the base interpreter's, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_source_files(source: str, split: str = "all") -> list[Path]:
    """Files of a local source (``"stdlib"``, a folder or a file) in ``split``, sorted for determinism."""
    root, files = _local_files(source)
    return _select_split(root, files, split, source)


def _local_files(source: str) -> tuple[Path, list[Path]]:
    """(root, all candidate files) for ``stdlib`` or an existing local path."""
    if source == "stdlib":
        root = stdlib_root()
        return root, _walk_files(root, (".py",), STDLIB_EXCLUDED_DIRS)
    path = Path(source).expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES + ROW_SUFFIXES:
            raise DataSourceError(f"unsupported file type {path.suffix!r} for {path}; use .txt/.py/.md/.jsonl/.parquet")
        return path.parent, [path]
    if path.is_dir():
        return path, _walk_files(path, TEXT_SUFFIXES + ROW_SUFFIXES, FOLDER_EXCLUDED_DIRS)
    raise DataSourceError(f"no local file or folder {source!r}")


def _walk_files(root: Path, suffixes: tuple[str, ...], excluded_dirs: frozenset[str]) -> list[Path]:
    """Matching files under ``root``, skipping hidden entries (.git, editor backups) and excluded folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found.append(Path(dirpath, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _select_split(root: Path, files: list[Path], split: str, source: str) -> list[Path]:
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r} for local source {source!r}; use one of {SPLITS}")
    if source != "stdlib" and Path(source).expanduser().is_file():
        # A single file cannot be split by file: it is the training data (or everything).
        if split == "val":
            raise DataSourceError(
                f"{source!r} is a single file, which cannot be split by file; pass a separate val file "
                "(as split='all') or a folder"
            )
        return files
    if split == "all":
        return files
    return [p for p in files if split_of(p.relative_to(root).as_posix()) == split]


def _content_signature(root: Path, files: list[Path]) -> str:
    """Cheap identity of local inputs (path, size, mtime) so an edited folder never reuses a stale cache."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Files: reading documents
# --------------------------------------------------------------------------------------------------------


@dataclass
class FileDocuments:
    """The documents of one file; ``skip_reason`` is set (and no documents) when the file is unusable."""

    path: Path
    documents: list[str] = field(default_factory=list)
    skip_reason: str | None = None
    empty_documents: int = 0  # empty rows inside a .jsonl/.parquet file


def read_file_documents(path: Path) -> FileDocuments:
    """Read one source file: whole-file text for .txt/.py/.md, one document per row for .jsonl/.parquet."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path)
    text, reason = _decode_text(path.read_bytes())
    if text is None:
        return FileDocuments(path, skip_reason=reason)
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(path, text)
    return FileDocuments(path, [text])


def _decode_text(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) for usable UTF-8 text, else (None, why it is skipped)."""
    if not raw.strip():
        return None, "empty"
    if b"\x00" in raw:  # UTF-8 text never contains NUL; this catches binaries and UTF-16 files
        return None, "binary (NUL bytes)"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    return (text, None) if text.strip() else (None, "empty")


def _parse_jsonl(path: Path, text: str) -> FileDocuments:
    result = FileDocuments(path)
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 and other line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict) or "text" not in row:
            raise DataSourceError(f"{path}:{lineno}: each .jsonl line must be an object with a 'text' field")
        _add_row_text(result, row["text"], f"{path}:{lineno}")
    return _mark_if_empty(result)


def _read_parquet(path: Path) -> FileDocuments:
    if path.stat().st_size == 0:
        return FileDocuments(path, skip_reason="empty")
    texts = _parquet_texts(path)
    if texts is None:
        return FileDocuments(path, skip_reason="not a readable parquet file")
    result = FileDocuments(path)
    for i, value in enumerate(texts):
        _add_row_text(result, value, f"{path}: row {i}")
    return _mark_if_empty(result)


def _parquet_texts(path: Path) -> list[Any] | None:
    """Column ``text`` of a parquet file (pyarrow if installed, else datasets); None if unreadable."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            schema = pq.read_schema(path)
        except Exception:  # noqa: BLE001 - any parse failure means "not parquet": skip and count it
            return None
        if "text" not in schema.names:
            raise DataSourceError(f"{path}: parquet file has no 'text' column (columns: {schema.names})")
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception:  # noqa: BLE001
        return None
    if "text" not in table.column_names:
        raise DataSourceError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
    return table["text"]


def _add_row_text(result: FileDocuments, value: Any, where: str) -> None:
    if value is None or value == "":
        result.empty_documents += 1
    elif isinstance(value, str):
        result.documents.append(value)
    else:
        raise DataSourceError(f"{where}: 'text' must be a string, got {type(value).__name__}")


def _mark_if_empty(result: FileDocuments) -> FileDocuments:
    if not result.documents:
        result.skip_reason = "no non-empty 'text' rows"
    return result


# --------------------------------------------------------------------------------------------------------
# Hub sources
# --------------------------------------------------------------------------------------------------------

_GENERIC_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("validation", "val", "test")}


@dataclass(frozen=True)
class HubSpec:
    """How to read one hub dataset. ``splits`` maps an lnfree split to hub splits tried in order."""

    repo: str
    splits: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(_GENERIC_SPLITS))
    streaming: bool = False
    carve_val_from_train: bool = False  # openwebtext only has "train"; val is carved out like nanoGPT
    expected_vocab: int | None = None  # pre-tokenized data: the vocabulary size its ids come from
    passthrough_splits: bool = False  # unknown split names (e.g. "train[:1%]") go to the hub unchanged
    prefer_ids: bool = False  # score the stored token ids rather than re-tokenising the text, when both exist


_OPENWEBTEXT = HubSpec("Skylion007/openwebtext", carve_val_from_train=True)
_PILE = HubSpec("monology/pile-uncopyrighted", streaming=True)
_APOLLO_PILE_GPT2 = HubSpec(
    "apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2", streaming=True, expected_vocab=50257
)
# Baroni et al.'s evaluation set (first 10k rows): all of it is evaluation data, so only "val" reads it,
# from a validation/test split if the hub has one, else from its "train" split. Their `pile_eval.py` scores its
# stored GPT-2 `input_ids` (concatenated as stored, then chunked), so we do too when the column is there.
_PILE_FILTERED = HubSpec("lucabaroni/apollo-pile-filtered-10k", splits={"val": ("validation", "test", "train")},
                         expected_vocab=50257, prefer_ids=True)

HUB_ALIASES: dict[str, HubSpec] = {
    "openwebtext": _OPENWEBTEXT,
    _OPENWEBTEXT.repo: _OPENWEBTEXT,
    "pile": _PILE,
    _PILE.repo: _PILE,
    _APOLLO_PILE_GPT2.repo: _APOLLO_PILE_GPT2,
    "pile-filtered": _PILE_FILTERED,
    _PILE_FILTERED.repo: _PILE_FILTERED,
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_spec(source: str) -> HubSpec | None:
    """The reading recipe for a hub name or alias, or None when ``source`` does not look like one."""
    if source in HUB_ALIASES:
        return HUB_ALIASES[source]
    if _HUB_NAME.match(source):
        return HubSpec(source, passthrough_splits=True)
    return None


def hub_aliases() -> list[str]:
    """Short names accepted as sources besides ``owner/name`` (for CLI help and error messages)."""
    return [name for name in HUB_ALIASES if "/" not in name]


def _hub_offline_requested() -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for name in names)


def _hub_reachable() -> bool:
    """One TCP connect to the hub endpoint: without it, datasets retries an unreachable hub for ~30 s."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides reachability; let datasets try
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_flags(offline: bool) -> Iterator[None]:
    """Force datasets/huggingface_hub into offline mode for one load.

    Both libraries read HF_HUB_OFFLINE once, at import; when it is set later (tests, notebooks) or the hub
    is unreachable, flipping their module flags makes the load use the local cache or fail immediately.
    """
    if not offline:
        yield
        return
    import datasets.config as datasets_config
    from huggingface_hub import constants as hub_constants

    flags = [
        (datasets_config, "HF_HUB_OFFLINE"),
        (datasets_config, "HF_DATASETS_OFFLINE"),
        (hub_constants, "HF_HUB_OFFLINE"),
    ]
    flags = [(module, name) for module, name in flags if hasattr(module, name)]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)


def _load_hub_dataset(spec: HubSpec, split: str, num_proc: int) -> Any:
    """The hub dataset (a ``Dataset`` or streaming ``IterableDataset``) for an lnfree split."""
    offline_reason = None
    if _hub_offline_requested():
        offline_reason = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    elif not _hub_reachable():
        offline_reason = "the hub is unreachable"
    try:
        with _hub_offline_flags(offline_reason is not None):
            return _load_hub_split(spec, split, num_proc)
    except DataSourceError:
        raise
    except Exception as err:  # noqa: BLE001 - every loading failure becomes one actionable line
        why = f"{offline_reason} and it is not in the local HF cache" if offline_reason else _first_line(err)
        # An unknown owner/name may be a mistyped local path: say that no such path exists either.
        note = f"; no local path {spec.repo!r} exists either" if spec.passthrough_splits else ""
        raise DataSourceError(f"cannot load hub dataset {spec.repo!r} ({why}){note}; {_OFFLINE_HINT}") from err


def _load_hub_split(spec: HubSpec, split: str, num_proc: int) -> Any:
    from datasets import load_dataset

    def load(hub_split: str) -> Any:
        if spec.streaming:
            return load_dataset(spec.repo, split=hub_split, streaming=True)
        return load_dataset(spec.repo, split=hub_split, num_proc=num_proc if num_proc > 1 else None)

    if spec.carve_val_from_train:
        if split not in ("train", "val"):
            raise DataSourceError(f"{spec.repo!r} supports splits 'train' and 'val', not {split!r}")
        parts = load("train").train_test_split(
            test_size=OPENWEBTEXT_VAL_FRACTION, seed=OPENWEBTEXT_SPLIT_SEED, shuffle=True
        )
        return parts["test" if split == "val" else "train"]
    candidates = spec.splits.get(split) or ((split,) if spec.passthrough_splits else ())
    if not candidates:
        raise DataSourceError(f"{spec.repo!r} has no lnfree split {split!r}; use one of {sorted(spec.splits)}")
    for hub_split in candidates[:-1]:
        try:
            return load(hub_split)
        except ValueError:  # datasets raises ValueError for an unknown split name: try the next one
            continue
    return load(candidates[-1])


def _hub_column(dataset: Any, spec: HubSpec) -> str:
    """``text`` for raw text, ``input_ids`` for pre-tokenized data."""
    columns = dataset.column_names
    if columns is None:  # some streaming datasets only know their columns after the first row
        columns = list(next(iter(dataset)).keys())
    for column in ("input_ids", "text") if spec.prefer_ids else ("text", "input_ids"):
        if column in columns:
            return column
    raise DataSourceError(f"hub dataset {spec.repo!r} has neither a 'text' nor an 'input_ids' column: {columns}")


# --------------------------------------------------------------------------------------------------------
# Source resolution
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A resolved source. ``kind`` is "files", "hub" or "cache"."""

    kind: str
    ident: str  # what the cache key records: "stdlib", an absolute path or a hub repo
    slug: str  # readable prefix of the cache folder name
    root: Path | None = None
    files: tuple[Path, ...] = ()
    hub: HubSpec | None = None
    signature: str | None = None


def _resolve_source(source: str, split: str) -> _Source:
    """Decide what ``source`` names: ``stdlib``, a local path (cache folder or data), else a hub dataset."""
    local = Path(source).expanduser()
    if source == "stdlib" or local.exists():
        if source != "stdlib" and _is_token_cache_dir(local):
            return _Source("cache", str(local.resolve()), _slug(local.name), root=local.resolve())
        return _resolve_local(source, split)
    spec = hub_spec(source)
    if spec is None:
        raise DataSourceError(
            f"unknown data source {source!r}: not 'stdlib', not an existing local file/folder, and not a hub "
            f"name ({', '.join(hub_aliases())} or owner/name)"
        )
    return _Source("hub", spec.repo, _slug(spec.repo.replace("/", "--")), hub=spec)


def _resolve_local(source: str, split: str) -> _Source:
    root, files = _local_files(source)
    selected = _select_split(root, files, split, source)
    if not selected:
        raise DataSourceError(
            f"no .txt/.py/.md/.jsonl/.parquet files in split {split!r} of {source!r} ({len(files)} files "
            f"in all; ~{VAL_FRACTION:.0%} of files go to val by path hash); use split='all' or more files"
        )
    ident = "stdlib" if source == "stdlib" else str(Path(source).expanduser().resolve())
    return _Source(
        "files",
        ident,
        _slug(Path(ident).name),
        root,
        tuple(selected),
        signature=_content_signature(root, selected),
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "source"


def iter_documents(source: str, split: str = "train", max_documents: int | None = None) -> Iterator[str]:
    """Yield the raw text documents of a source (for example to train a tokenizer on ``stdlib`` train)."""
    resolved = _resolve_source(source, split)
    if resolved.kind == "cache":
        raise DataSourceError(f"{source!r} is a token cache; it holds token ids, not text")
    count = 0
    for texts in _source_texts(resolved, split, num_proc=1):
        for text in texts:
            if max_documents is not None and count >= max_documents:
                return
            count += 1
            yield text


def _source_texts(resolved: _Source, split: str, num_proc: int) -> Iterator[list[str]]:
    if resolved.kind == "files":
        for path in resolved.files:
            yield read_file_documents(path).documents
        return
    dataset = _load_hub_dataset(resolved.hub, split, num_proc)
    column = _hub_column(dataset, resolved.hub)
    if column != "text":
        raise DataSourceError(f"{resolved.ident!r} is pre-tokenized; it has no text documents")
    for batch in dataset.select_columns([column]).iter(batch_size=_HUB_BATCH_ROWS):
        yield [text for text in batch[column] if text]


def _is_token_cache_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).is_file() and (path / TOKENS_FILE).exists()
