"""Load and save models in the `transformers` checkpoint format: a folder with config.json and safetensors.

Sources are a local folder or a hub id. Weights load from safetensors, or from `pytorch_model.bin` with
`torch.load(weights_only=True)` — never by unpickling arbitrary objects. Custom code from a checkpoint is never
executed: lnfree reads the config itself and maps it to one of its own families.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..jsonfile import read_json
from .base import Family, LNModel
from .gpt2 import GPT2_FAMILY
from .llama import LLAMA_FAMILY
from .neox import NEOX_FAMILY

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2_FAMILY, LLAMA_FAMILY, NEOX_FAMILY)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def family_of(hf_config: dict) -> Family:
    """The family that reads this config.json, or a one-line error naming what was found and what works."""
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs) or (not archs and model_type in family.model_types):
            return family
    supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
    found = ", ".join(archs) or f"model_type={model_type!r}"
    raise ValueError(f"unsupported model architecture {found}; supported: {', '.join(supported)}")


@dataclass(frozen=True)
class ModelSource:
    """Where a model named on the command line lives. Exactly one of `model_dir` (a transformers checkpoint
    folder) and `checkpoint` (the newest checkpoint of a run that has no final/ yet) is set."""

    name: str
    model_dir: Path | None
    run_dir: Path | None  # the `lnfree remove` / `pretrain` run folder it belongs to, if any
    checkpoint: Path | None = None
    gguf: dict | None = None  # a GGUF source: its file name, sha256 and size (model_dir is its dequantized folder)


def resolve_source(source: str | os.PathLike, *, unfinished_runs: bool = False) -> ModelSource:
    """The one model-source resolver: a checkpoint folder, a run folder (its final/; with `unfinished_runs`,
    its newest checkpoint when there is no final/ yet), a GGUF file (or a folder holding one, or a named GGUF source
    such as `smollm2-135m`) dequantized once into a cached folder, or a hub id fetched into the local hub cache."""
    from . import gguf

    if str(source) in gguf.NAMED_SOURCES:
        source_file = gguf.named_gguf(str(source))
    else:
        source_file = gguf.gguf_file_in(Path(source).expanduser())
    if source_file is not None:
        made = gguf.dequantized(source_file)
        return ModelSource(str(source), made.model_dir, None, gguf=made.record())
    path = Path(source).expanduser()
    if (path / "final" / "config.json").is_file():
        return ModelSource(str(source), path / "final", path)
    if path.exists():
        if (path / "config.json").is_file():
            return ModelSource(str(source), path, _run_dir_of(path))
        if (path / "checkpoints").is_dir():
            from ..checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(path)
            if not unfinished_runs:
                raise ValueError(f"{path} is a run folder without final/ (unfinished run); give a finished run")
            if ckpt is not None:
                return ModelSource(str(source), None, path, ckpt)
        raise FileNotFoundError(f"{path} has no config.json, no final/ model and no run checkpoint; point at a "
                                "transformers checkpoint folder or an `lnfree remove` run folder")
    if str(source).count("/") > 1 or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model folder: {source}")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin",
                    "generation_config.json", *TOKENIZER_FILES]
        return ModelSource(str(source), Path(snapshot_download(str(source), allow_patterns=patterns)), None)
    except Exception as e:  # offline, unknown repo, gated …
        raise FileNotFoundError(f"cannot fetch model {source!r} from the hub ({type(e).__name__}); "
                                "give a local checkpoint folder instead") from None


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """The transformers checkpoint folder of a source (a finished run's final/, a folder, a hub id)."""
    return resolve_source(source).model_dir


def _run_dir_of(folder: Path) -> Path | None:
    for cand in (folder, folder.parent):
        if any((cand / n).is_file() for n in ("run.json", "metrics.jsonl")) or any(cand.glob("eval*.json")):
            return cand
    return None


def load_source(source: str | os.PathLike, *, unfinished_runs: bool = False,
                dtype: torch.dtype | None = None) -> tuple[LNModel, ModelSource]:
    """(model as stored — live, frozen or folded —, where it came from) for any source `resolve_source` reads."""
    where = resolve_source(source, unfinished_runs=unfinished_runs)
    if where.checkpoint is not None:
        from ..checkpoint import load_checkpoint

        with torch.random.fork_rng(devices=[]):  # loading a run checkpoint restores RNG state; keep ours
            model, _ = load_checkpoint(where.checkpoint)
        model.source = str(source)
        return (model.to(dtype) if dtype is not None else model), where
    return load_model(where.model_dir, dtype=dtype), where


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no model.safetensors (or pytorch_model.bin)")


def load_model(source: str | os.PathLike, dtype: torch.dtype | None = None) -> LNModel:
    """Any supported `transformers` checkpoint (folder or hub id) → our model with every site live."""
    folder = resolve_source(source).model_dir
    hf_config = read_json(folder / "config.json")
    family = family_of(hf_config)
    model = family.from_hf(hf_config, read_state_dict(folder))
    model.source = str(source)
    return model.to(dtype) if dtype is not None else model


def save_model(model: LNModel, out_dir: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files copied from a folder), atomically.

    The folder appears complete or not at all: it is written beside the target and renamed into place.
    A model with frozen sites cannot be written in this format (it would silently load as the all-live
    original); fold it first.
    """
    if any(s.is_frozen for s in model.norm_sites().values()):
        raise ValueError("model has frozen norm sites that a transformers checkpoint cannot express; "
                         "call model.fold() (or save a run checkpoint) instead")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[model.family]
    hf_config, state = family.to_hf(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        if tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), tmp)
        share_like_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def share_like_umask(folder: Path) -> None:
    """Give a folder written through a private temporary directory (mkdtemp: 0700; safetensors: 0600) the
    permissions the user's umask gives new files, as every other tool's output has, so that colleagues on a shared
    filesystem can read it."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
