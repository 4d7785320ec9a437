"""Load and save models in the `transformers` checkpoint format: a folder with config.json and safetensors.

Folders only: a model named by hub id, run folder or GGUF file is found by `lnfree.sources`. Weights load from
safetensors, or from `pytorch_model.bin` with `torch.load(weights_only=True)` — never by unpickling arbitrary
objects. Custom code from a checkpoint is never executed: lnfree reads the config itself and maps it to one of
its own families.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..jsonfile import read_json
from .base import LNModel
from .families import FAMILIES, family_of

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


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


def load_model(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> LNModel:
    """A `transformers` checkpoint folder of a supported family (or a finished run folder: its final/) → our model
    as stored. Hub ids, GGUF files and unfinished runs: `lnfree.sources.load_source`."""
    folder = Path(folder).expanduser()
    if (folder / "final" / "config.json").is_file():
        folder = folder / "final"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; point at a transformers checkpoint folder or an "
                                "`lnfree remove` run folder")
    hf_config = read_json(folder / "config.json")
    family = family_of(hf_config)
    model = family.from_hf(hf_config, read_state_dict(folder))
    model.source = str(folder)
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
