"""Export pipeline: resolve a source, make it norm-free, write a format, reload it, check parity, publish.

Sources (`load_norm_free`):
  * a folded model folder (`LNFreeGPT2LMHeadModel`) — used as is;
  * a published LN-free GPT-2 (eps = 1e12, weights ×1e6/σ̂) — our loader reads it as every site frozen at
    σ̂ = sqrt(eps), and it is folded;
  * a run folder of `lnfree remove` — its `final/` model, else its latest checkpoint (σ̂ buffers included);
  * any other folder or hub id `load_model` reads; a model whose sites are all frozen without specials is
    folded, one with a live LayerNorm (or a live special σ̂) is refused with a one-line error.

Every export is written into a hidden folder beside DIR, reloaded with the library it targets and with our
loader, compared with the norm-free source (max-abs logits ≤ `PARITY_TOL`, evaluated in float64 from the
stored fp32 weights; the float32 figure is reported beside it), given its model card, and only then renamed
to DIR. Any failure removes the hidden folder and leaves a pre-existing DIR untouched.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..jsonfile import read_json
from ..method.fold import check_foldable
from ..models import FAMILIES
from ..models.base import LNModel
from ..models.io import TOKENIZER_FILES, copy_tokenizer_files, load_model, save_model, share_like_umask
from ..sources import load_source
from .result import ExportResult, Source

FORMATS = ("hf", "hf-compat")
# The gate on a reloaded export: max-abs logits, evaluated in float64 from the stored fp32 weights (see
# reload_parity). A correct hf export reproduces the source to float64 rounding (~1e-12 on GPT-2-small shapes);
# hf-compat carries the eps=1e12 convention's relative error of var/(2·eps) per LN (1.2e-5 measured on a
# GPT-2-small shape). Each gate leaves a margin of ~10^4 and ~10 over those.
PARITY_TOL = {"hf": 1e-8, "hf-compat": 1e-4}
# hf-compat's differences are fp32 roundings of rescaled gains (a kept tied head's per-channel gain, sqrt(eps)·γ/σ̂):
# relative to the logits' size, ~1e-7. A real model's logits reach hundreds where GPT-2-small's stay near 20
# (SmolLM2-135M's first two blocks, folded: 900 at position 0, 6e-5 off), so the hf-compat gate grows with them.
COMPAT_REL_TOL = 1e-6


def parity_tolerance(fmt: str, reference: LNModel) -> float:
    """The gate on a reloaded export of `reference`: `PARITY_TOL`, for hf-compat at least `COMPAT_REL_TOL` × the
    reference's largest |logit| on the parity batches."""
    if fmt != "hf-compat":
        return PARITY_TOL[fmt]
    with torch.no_grad():
        ref = copy.deepcopy(reference).double().eval()
        scale = max(ref(idx).abs().max().item() for idx in sample_batches(reference))
    return max(PARITY_TOL[fmt], COMPAT_REL_TOL * scale)


class ParityError(ValueError):
    """A written export does not reproduce the source's logits."""


# ---- sources ------------------------------------------------------------------------------------------------
def as_norm_free(model: LNModel, what: str = "model") -> tuple[LNModel, bool]:
    """The norm-free twin of `model` (folded if all its sites are frozen without specials), and whether it folded.

    Raises a one-line ValueError when normalization is still live.
    """
    if not model.has_normalization:
        return model.eval(), False
    try:
        check_foldable(model)
    except ValueError as e:
        raise ValueError(f"{what}: {e}; only LN-free models export (a finished run, a folded or an eps=1e12 "
                         "model)") from None
    return model.fold().eval(), True


def load_norm_free(source: str | os.PathLike, allow_partial: bool = True) -> Source:
    """Resolve `source` (see module docstring) to a norm-free model, or raise a one-line error. A run folder
    without final/ (an unfinished run) is read from its newest checkpoint only with `allow_partial`."""
    model, where = load_source(source, unfinished_runs=True)
    partial = None
    if where.checkpoint is not None:
        state = read_json(where.checkpoint / "state.json")
        partial = f"step {state['step']} of {state.get('schedule', {}).get('total_steps', '?')}"
        if not allow_partial:
            raise ValueError(f"{source} is an unfinished run (no final/; newest checkpoint at {partial}); finish it "
                             "with `lnfree remove … --resume`, or pass --allow-partial to export that checkpoint")
    folded, did_fold = as_norm_free(model, str(source))
    return Source(folded, str(source), where.model_dir, where.run_dir, did_fold, partial)


def resolve(model_or_path: LNModel | str | os.PathLike, tokenizer: Any = None) -> tuple[LNModel, Any]:
    """(norm-free GPT-2, tokenizer) from a model object (folded here if needed) or anything `load_norm_free` reads.

    The tokenizer is `tokenizer` itself, or loaded from `tokenizer` when it is a folder or hub id, or from the
    model's own folder; the interop libraries need one to build their wrappers.
    """
    if isinstance(model_or_path, LNModel):
        model, _ = as_norm_free(model_or_path)
        origin = getattr(model_or_path, "source", None)
        model_dir = Path(origin) if origin and Path(origin).is_dir() else None
    else:
        src = load_norm_free(model_or_path)
        model, model_dir = src.model, src.model_dir
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        where = tokenizer if tokenizer is not None else model_dir
        if where is None or (Path(where).is_dir() and not any((Path(where) / n).is_file() for n in TOKENIZER_FILES)):
            raise ValueError(f"no tokenizer: {where or 'the model object'} has no tokenizer files; pass "
                             "tokenizer= (a tokenizer, or the folder or hub id of one)")
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(where)
    return model, tokenizer


# ---- parity -------------------------------------------------------------------------------------------------
def sample_batches(model: LNModel, seed: int = 0) -> list[Tensor]:
    """Token batches for parity checks: short random ones with EOT sprinkled in, and one full-context row."""
    g = torch.Generator().manual_seed(seed)
    eot = next((i for i in model.eos_token_ids if i < model.vocab_size), None)
    batches = []
    for batch, seq in ((4, min(32, model.context_length)), (1, min(model.context_length, 256))):
        idx = torch.randint(0, model.vocab_size, (batch, seq), generator=g)
        if eot is not None:
            idx[:, 5::9] = eot
        batches.append(idx)
    return batches


@torch.no_grad()
def max_abs_diff(reference: torch.nn.Module, other: torch.nn.Module, batches: list[Tensor]) -> float:
    """Max-abs logit difference between our model and another (ours, or a transformers model)."""
    worst = torch.zeros((), dtype=torch.float64)
    for idx in batches:
        ref, out = reference(idx), other(idx)
        out = out.logits if hasattr(out, "logits") else out
        worst = torch.maximum(worst, (ref.double() - out.double()).abs().max())  # NaN stays NaN: never a pass
    return worst.item()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No loading/writing progress bars or warnings from transformers inside the block; restored after."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def reload_parity(folder: Path, fmt: str, reference: LNModel) -> tuple[dict[str, float], dict[str, float]]:
    """Reload a written export the way users will (transformers Auto classes, and lnfree's loader) and compare.

    Returns (float64 errors — the gate —, float32 errors — for information). Both sides are evaluated from
    the same stored fp32 weights; in float64 the difference is the export's function difference alone, while
    in float32 it also contains rounding noise that grows with the logit scale (measured: 5e-4 on a
    GPT-2-small-shaped model whose logits reach 260, where fp32 itself is 8e-4 off fp64), which would make a
    fp32 gate reject correct exports of real-size models.
    """
    from transformers import AutoModelForCausalLM

    from . import hf  # noqa: F401  (registers every family's norm-free class with the Auto classes)

    batches = sample_batches(reference)
    with quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    family = FAMILIES[reference.family].hf()
    expected = family.classes(reference)[0 if fmt == "hf" else 1]
    if type(loaded).__name__ != expected:
        raise ParityError(f"{fmt} export reloads as {type(loaded).__name__}, expected {expected}")
    ours = as_norm_free(load_model(folder, dtype=torch.float64), f"reloaded {fmt} export")[0]
    ref = copy.deepcopy(reference).double().eval()
    routes = {"transformers": loaded, "lnfree": ours}
    errors = {dtype: {} for dtype in (torch.float64, torch.float32)}
    for dtype, table in errors.items():
        ref.to(dtype)
        for name, model in routes.items():
            table[name] = max_abs_diff(ref, model.to(dtype), batches)
    return errors[torch.float64], errors[torch.float32]


# ---- writing --------------------------------------------------------------------------------------------------
def write_format(model: LNModel, folder: Path, fmt: str) -> None:
    """Write `model` into the (existing, empty) folder in one export format."""
    if fmt == "hf":
        save_model(model, folder)  # config + safetensors in the LNFreeGPT2LMHeadModel layout
    elif fmt == "hf-compat":
        from .compat import to_compat_hf

        with quiet_transformers():
            to_compat_hf(model).save_pretrained(folder)
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")


EXPORT_MARK = "lnfree-export.json"  # written into every export: what --overwrite may replace
# what an export wrote before the mark listed its files
_EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "README.md", EXPORT_MARK,
                 *TOKENIZER_FILES)


def _check_target(out: Path, overwrite: bool) -> None:
    """A new or empty folder; an earlier lnfree export only with `overwrite`; never anything else."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; give a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / EXPORT_MARK).is_file():
        raise FileExistsError(f"--out {out} holds files that lnfree export did not write; give a new or empty folder")
    if not overwrite:
        raise FileExistsError(f"--out {out} already holds an lnfree export; give a new folder, or --overwrite to "
                              "replace it")
    mark = read_json(out / EXPORT_MARK)
    written = set(mark.get("files", _EXPORT_FILES) if isinstance(mark, dict) else ())
    foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
    if foreign:  # --overwrite replaces the whole folder: never with a file in it that the export did not write
        raise FileExistsError(f"--out {out} holds files the earlier export did not write ({', '.join(foreign[:3])}); "
                              "move them out first, or give a new folder")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an existing export at `out` is replaced only now."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def export_model(source: str | os.PathLike | Source, out: str | os.PathLike, fmt: str = "hf", *,
                 card: bool = True, push_to_hub: str | None = None, allow_partial: bool = False,
                 overwrite: bool = False) -> ExportResult:
    """Export `source` to `out` in format `fmt`, parity-checked; returns the measured reload errors. An
    unfinished run is refused unless `allow_partial` (the card then says which checkpoint it came from). `out`
    must be new or empty, or (with `overwrite`) an earlier lnfree export, replaced only once the new one passed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    src = source if isinstance(source, Source) else load_norm_free(source, allow_partial)
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_format(src.model, tmp, fmt)
        if src.model_dir is not None and any((src.model_dir / n).is_file() for n in TOKENIZER_FILES):
            copy_tokenizer_files(src.model_dir, tmp)
        parity, parity_fp32 = reload_parity(tmp, fmt, src.model)
        worst, gate = max(parity.values()), parity_tolerance(fmt, src.model)
        if not worst <= gate:
            routes = ", ".join(f"{k} {v:.2e}" for k, v in parity.items())
            hint = "; the eps=1e12 convention is exact only up to var/2e12 per LN: use --format hf" \
                if fmt == "hf-compat" else ""
            raise ParityError(f"{fmt} export failed its parity check: max-abs logit error {worst:.2e} > "
                              f"{gate:.1e} ({routes}); nothing written{hint}")
        result = ExportResult(out, fmt, parity, parity_fp32, gate)
        if card:
            from .card import write_card

            write_card(tmp, src, result)
        written = sorted({p.name for p in tmp.iterdir()} | {EXPORT_MARK})  # what a later --overwrite may replace
        (tmp / EXPORT_MARK).write_text(json.dumps({"format": fmt, "source": src.name, "parity": parity,
                                                   "files": written}, indent=1))
        share_like_umask(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push_to_hub:
        push(out, push_to_hub)
    return result


def push(folder: Path, repo_id: str) -> str:
    """Upload an export folder to the Hugging Face hub (creates the repo if needed); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="lnfree export")
    return f"https://huggingface.co/{repo_id}"
