"""Activation patching for `lnfree compare`: prompt sets of clean/corrupt pairs, a cache run that also reads
every MLP's neurons, and every head's output patched from the corrupt run into the clean one.

A prompt set is a JSONL file of rows {"clean", "corrupt", "answer", "wrong"}: clean and corrupt tokenize to the same
length, answer and wrong to one token each (the first row that does not is named in a one-line error). Packaged
(src/lnfree/prompts/): `ioi-gpt2`, indirect-object identification for GPT-2's tokenizer ("When Mary and John went
to the store, John gave a bottle of milk to" → " Mary"; the corrupt prompt repeats the other name, so the answer
flips); `stdlib-copy`, Python name copying for the standard-library analogs' tokenizer (a setter / validator /
converter whose own name says which argument it assigns or returns: "def set_mode(self, mode): self._mode = mode;
return self._" → "mode"; the corrupt prompt is the same function for another name). Prompts are tokenized as the
tokenizer does by default (a BOS where it adds one); rows are right-padded, which a causal model never reads.

Hooks sit on the family's output projections (`LNModel.output_projections()`): the attention output projection
reads z (B, T, H·dh), so replacing a head's slice of its input patches that head; the MLP output projection reads
the neuron activations, cached as TransformerLens' `blocks.{i}.mlp.hook_post`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models.base import LNModel

PROMPT_SETS = {"ioi-gpt2": "ioi_gpt2.jsonl", "stdlib-copy": "stdlib_copy.jsonl"}  # packaged: src/lnfree/prompts/


# ---- prompt sets -----------------------------------------------------------------------------------------------
@dataclass
class PromptSet:
    """Clean/corrupt prompt pairs as right-padded id tensors (P, T); `last` is each row's final prompt position."""

    name: str
    clean: Tensor
    corrupt: Tensor
    last: Tensor
    answer: Tensor
    wrong: Tensor


def prompt_set_path(name: str) -> Path:
    """A packaged set's file, or the path given."""
    if name in PROMPT_SETS:
        return Path(str(resources.files("lnfree") / "prompts" / PROMPT_SETS[name]))
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no prompt set {name!r}: neither packaged ({', '.join(PROMPT_SETS)}) nor a file")
    return path


def read_prompt_set(name: str, tokenizer: Any) -> PromptSet:
    """Tokenize a prompt set, or raise a one-line error naming its first bad row."""
    path = prompt_set_path(name)
    rows, clean, corrupt, answer, wrong = [], [], [], [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompt set {name} row {i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: not valid JSON") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in ("clean", "corrupt", "answer",
                                                                                     "wrong")):
            raise ValueError(f"{where}: expected an object with string fields clean, corrupt, answer, wrong")
        ids = {k: tokenizer(row[k])["input_ids"] for k in ("clean", "corrupt")}
        if len(ids["clean"]) != len(ids["corrupt"]):
            raise ValueError(f"{where}: clean and corrupt are {len(ids['clean'])} and {len(ids['corrupt'])} tokens; "
                             "they must tokenize to the same length")
        for key in ("answer", "wrong"):
            tokens = tokenizer(row[key], add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise ValueError(f"{where}: {key} {row[key]!r} is {len(tokens)} tokens for this tokenizer, not one")
            (answer if key == "answer" else wrong).append(tokens[0])
        if answer[-1] == wrong[-1]:
            raise ValueError(f"{where}: answer and wrong are the same token")
        clean.append(ids["clean"])
        corrupt.append(ids["corrupt"])
        rows.append(row)
    if not rows:
        raise ValueError(f"prompt set {name} has no rows")
    T = max(len(c) for c in clean)
    pad = lambda seqs: torch.tensor([s + [s[-1]] * (T - len(s)) for s in seqs])  # causal: padding after is unread
    return PromptSet(name if name in PROMPT_SETS else path.stem, pad(clean), pad(corrupt),
                     torch.tensor([len(c) - 1 for c in clean]), torch.tensor(answer), torch.tensor(wrong))


def select_prompt_sets(names: list[str] | None, tokenizer: Any) -> tuple[list[PromptSet], dict[str, str]]:
    """The named sets (any bad row is an error), or by default every packaged set this tokenizer can read (the
    others are skipped with the reason)."""
    if names is not None:
        return [read_prompt_set(n, tokenizer) for n in names], {}
    sets, skipped = [], {}
    for name in PROMPT_SETS:
        try:
            sets.append(read_prompt_set(name, tokenizer))
        except ValueError as e:
            skipped[name] = str(e)
    return sets, skipped


@torch.no_grad()
def run_with_cache(model: LNModel, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the activation cache, with every MLP's neuron activations as `blocks.{i}.mlp.hook_post`."""
    cache: dict[str, Tensor] = {}
    handles = [mlp_out.register_forward_pre_hook(
        lambda _m, args, i=i: cache.__setitem__(f"blocks.{i}.mlp.hook_post", args[0]))
        for i, (_, mlp_out) in enumerate(model.output_projections())]
    try:
        logits = model(idx, cache=cache)
    finally:
        for h in handles:
            h.remove()
    return logits, cache


# ---- patching --------------------------------------------------------------------------------------------------
def _logit_diff(logits: Tensor, ps: PromptSet) -> Tensor:
    """(P,) answer − wrong logit at each row's last prompt token, from (P, T, V) logits."""
    rows = torch.arange(len(ps.last), device=logits.device)
    last = logits[rows, ps.last.to(logits.device)]  # (P, V)
    return last[rows, ps.answer.to(logits.device)] - last[rows, ps.wrong.to(logits.device)]


@torch.no_grad()
def patch_heads(model: LNModel, ps: PromptSet, progress: bool = False, max_elements: int = 50_000_000) -> dict:
    """Every head's z from the corrupt run into the clean run (all positions): the mean change of the logit
    difference per head, (L, H), with the clean and corrupt logit differences."""
    device = next(model.parameters()).device
    clean, corrupt = ps.clean.to(device), ps.corrupt.to(device)
    ld_clean = _logit_diff(model(clean), ps)
    corrupt_logits, cache = run_with_cache(model, corrupt)
    ld_corrupt = _logit_diff(corrupt_logits, ps)
    P, T = clean.shape
    L = model.n_layers
    H = cache["blocks.0.attn.hook_z"].shape[2]
    per_chunk = max(1, min(H, max_elements // max(1, P * T * model.vocab_size)))  # heads patched per forward
    delta = torch.zeros(L, H, dtype=torch.float64)
    bar = tqdm(total=L * H, desc=f"patching {ps.name}", unit="head", disable=not progress, leave=False)
    for layer, (attn_out, _) in enumerate(model.output_projections()):
        z = cache[f"blocks.{layer}.attn.hook_z"]  # (P, T, H, dh)
        for h0 in range(0, H, per_chunk):
            heads = torch.arange(h0, min(H, h0 + per_chunk), device=device)
            k = len(heads)

            def patch(_module, args, heads=heads, k=k, z=z):
                x = args[0].clone().view(k, P, T, H, -1)
                x[torch.arange(k, device=device), :, :, heads] = z[:, :, heads].permute(2, 0, 1, 3)
                return (x.view(k * P, T, -1),)

            handle = attn_out.register_forward_pre_hook(patch)
            try:
                logits = model(clean.repeat(k, 1))  # (k·P, T, V): copy j patches head h0 + j
            finally:
                handle.remove()
            for j in range(k):
                ld = _logit_diff(logits[j * P:(j + 1) * P], ps)
                delta[layer, h0 + j] = (ld - ld_clean).double().mean().cpu()
            bar.update(k)
    bar.close()
    gap = (ld_corrupt - ld_clean).double().mean().item()
    return {"clean_logit_diff": ld_clean.double().mean().item(),
            "corrupt_logit_diff": ld_corrupt.double().mean().item(), "delta": delta.numpy(),
            "effect": (delta / gap).numpy() if gap != 0 else np.full(delta.shape, np.nan)}
