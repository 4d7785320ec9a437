"""`lnfree compare`: how far an LN-free model is from its original — in its outputs, its components, its circuits.

Every figure compares the ORIGINAL (the reference, with its norms) with the LN-FREE model; with a VANILLA control
(the same fine-tuning with norms kept) the outputs are compared with it too, and the mechanism figures of original
vs vanilla stand beside those of original vs LN-free as the control: how much fine-tuning alone moves them.

1. Outputs, on the evaluation protocol's sequences (`lnfree.analysis.evaluate`: no BOS, every next-token prediction):
   KL(original ‖ LN-free) and KL(vanilla ‖ LN-free) per token in nats (mean and quantiles), top-1 agreement,
   and per model CE, mean entropy (nats) and expected calibration error (15 equal-width bins of top-1 confidence).
2. Mechanism, per component, on the same sequences:
   * attention-pattern similarity of each head: 1 − JS(p_ref, p_model) / ln 2 of each query row (queries ≥ 1; row
     0 is trivially identical), averaged — 1 for identical patterns, 0 for disjoint ones;
   * direct logit attribution of every residual write (embeddings, each head's z·W_O, each MLP, biases) to the
     correct next token, measured against the mean over the vocabulary (u = W_U[y] − mean_v W_U[v], so a constant
     shift of all logits attributes nothing). Exact on a norm-free model: the attributions plus the bias term sum to
     logit[y] − mean logit. On a model with a final norm the usual approximation: the norm's per-token divisor is
     frozen at its value on that token (centring and γ applied, β in the bias term), so the sum is again exact
     but an attribution is no longer the component's direct effect (`dla_error_vs_direct_effect`:
     Σ|DLA − DE| / Σ|DE|, Baroni et al.'s measure). Per layer, the correlation of the two models' attributions
     over that layer's heads and MLP and every token; per head, the relative change rms(a − b)/rms(a, b);
   * MLP neuron activations (`mlp.hook_post`) correlated over tokens at the same index (fine-tuning keeps the
     basis), with the neurons that changed most — each with `unembed_ratio`, how strongly its output direction
     reaches the ORIGINAL's centred unembedding relative to a typical direction (≪ 1: it writes into W_U's null
     space, as entropy neurons do).
3. Patching, per prompt set (`lnfree.analysis.patching`: JSONL rows {"clean", "corrupt", "answer", "wrong"}; clean and
   corrupt of equal token length, answer and wrong one token each): every head's output (z) taken from the corrupt
   run into the clean run, at every position, in each model; the effect is the mean change of the logit difference
   answer − wrong at the last prompt token (`delta`, nats; `effect` divides it by the full corrupt − clean change).
   The two models' `delta` maps are correlated over all heads.
Per-head tables rank the heads that changed most first: lowest attention similarity, largest DLA change, largest
change of patching effect.

Here: the models' shapes, `compare_models` (every figure above, from the per-batch measurements of
`compare_measures.py`) and `run_compare` (models, data and prompt sets by name); the report is `compare_report.py`'s.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models.base import LNModel
from .compare_measures import ModelStats, PairStats, expected_calibration_error, pearson, relative_change
from .evaluate import summarize_losses, token_kl
from .patching import PromptSet, patch_heads, run_with_cache, select_prompt_sets

ENTROPY_BINS = 40
SHAPE_KEYS = ("family", "layers", "heads", "d_model", "d_mlp", "vocab")


# ---- models ----------------------------------------------------------------------------------------------------
def shape_of(model: LNModel) -> dict[str, Any]:
    rows = dict(model.architecture_rows())
    return {"family": model.family, **{k: rows[k] for k in SHAPE_KEYS[1:]}}


def check_same_shape(models: dict[str, LNModel]) -> dict[str, Any]:
    """The common shape, or a one-line error naming the first mismatch."""
    label = lambda name, m: f"{name} ({m.source})" if getattr(m, "source", None) else name
    (ref_name, ref), *others = models.items()
    want = shape_of(ref)
    for name, model in others:
        got = shape_of(model)
        for key in SHAPE_KEYS:
            if got[key] != want[key]:
                raise ValueError(f"{label(ref_name, ref)} and {label(name, model)} differ in {key}: {want[key]} vs "
                                 f"{got[key]}; compare needs models of one shape")
    return want


# ---- the comparison --------------------------------------------------------------------------------------------
@torch.no_grad()
def compare_models(original: LNModel, lnfree: LNModel, batches: Iterable[Tensor], *, vanilla: LNModel | None = None,
                   prompt_sets: list[PromptSet] | None = None, top_neurons: int = 20, total: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Outputs, mechanisms and patching of `lnfree` against `original` (and `vanilla`), on (B, T) id batches and
    prompt sets → a JSON-ready dict (what `lnfree compare` writes to report.json). A `lnfree` model with frozen
    norms is folded; one that still normalises is refused."""
    from ..export.core import as_norm_free

    lnfree, _ = as_norm_free(lnfree, "the LN-free model")
    models = {"original": original, "lnfree": lnfree, **({"vanilla": vanilla} if vanilla is not None else {})}
    shape = check_same_shape(models)
    device = next(original.parameters()).device
    for m in models.values():
        m.eval()
    stats = {name: ModelStats() for name in models}
    pairs = {name: PairStats(shape["layers"]) for name in models if name != "original"}
    kl: dict[str, list[Tensor]] = {name: [] for name in models if name != "lnfree"}
    n_sequences = 0
    for idx in tqdm(batches, total=total, desc="compare", unit="batch", disable=not progress, leave=False):
        idx = idx.to(device)
        n_sequences += idx.shape[0]
        logits_ref, cache_ref = run_with_cache(original, idx)
        stats["original"].add(original, logits_ref, cache_ref, idx)
        logits_free, cache = run_with_cache(lnfree, idx)
        stats["lnfree"].add(lnfree, logits_free, cache, idx)
        pairs["lnfree"].add(cache_ref, cache)
        kl["original"].append(token_kl(logits_ref, logits_free).cpu())
        del cache
        if vanilla is not None:
            logits, cache = run_with_cache(vanilla, idx)
            stats["vanilla"].add(vanilla, logits, cache, idx)
            pairs["vanilla"].add(cache_ref, cache)
            kl["vanilla"].append(token_kl(logits, logits_free).cpu())
            del cache, logits
        del cache_ref, logits_ref, logits_free
    if not n_sequences:
        raise ValueError("no sequences to compare")
    arrays = {name: s.arrays() for name, s in stats.items()}
    names = stats["original"].names
    result: dict[str, Any] = {
        "shape": shape,
        "tokens": int(arrays["original"]["entropy"].size), "sequences": n_sequences,
        "outputs": _outputs(arrays, kl, stats, shape["vocab"]),
        "mechanism": {name: _mechanism(pair, arrays["original"], arrays[name], names, original, top_neurons)
                      for name, pair in pairs.items()},
        "patching": {ps.name: _patching(models, ps, progress) for ps in prompt_sets or []},
    }
    return _jsonable(result)


def _outputs(arrays: dict, kl: dict, stats: dict, vocab: int) -> dict[str, Any]:
    edges = np.linspace(0.0, math.log(vocab), ENTROPY_BINS + 1)
    per_model = {}
    for name, a in arrays.items():
        ece, reliability = expected_calibration_error(a["confidence"], a["correct"])
        s = stats[name]
        per_model[name] = {
            "ce": float(a["ce"].mean(dtype=np.float64)), "entropy": float(a["entropy"].mean(dtype=np.float64)),
            "ece": ece, "accuracy": float(a["correct"].mean()), "confidence": float(a["confidence"].mean()),
            "entropy_hist": np.histogram(np.clip(a["entropy"], 0, edges[-1]), bins=edges)[0],
            "reliability": reliability,
            "dla_error_vs_direct_effect": s.de_num / s.de_den if s.de_den > 0 else 0.0}
    kl_stats = {}
    for name, parts in kl.items():
        st = summarize_losses(torch.cat(parts).numpy())
        kl_stats[name] = {"mean": st.mean, "median": st.median, "p95": st.p95, "p999": st.p999, "max": st.max}
    top1 = {name: float((arrays[name]["argmax"] == arrays["lnfree"]["argmax"]).mean()) for name in kl}
    return {"kl_to_lnfree": kl_stats, "top1_agreement_with_lnfree": top1, "models": per_model,
            "entropy_bin_edges": edges}


def _mechanism(pair: PairStats, ref: dict, mod: dict, names: list[str], original: LNModel,
               top_neurons: int) -> dict[str, Any]:
    """Attention, DLA and neuron figures of one (original, model) pair."""
    sim = pair.attention_similarity()  # (L, H)
    a, b = ref["dla"], mod["dla"]  # (N, tokens)
    components = [{"component": n, "mean_original": float(a[i].mean()), "mean_model": float(b[i].mean()),
                   "correlation": pearson(a[i], b[i]), "relative_change": relative_change(a[i], b[i])}
                  for i, n in enumerate(names)]
    per_layer = []
    for layer in range(sim.shape[0]):
        sel = [i for i, n in enumerate(names) if n.startswith(f"L{layer}H") or n == f"L{layer}MLP"]
        per_layer.append({"layer": layer, "correlation": pearson(a[sel], b[sel]),
                          "mean_abs_original": float(np.abs(a[sel]).mean()),
                          "mean_abs_model": float(np.abs(b[sel]).mean())})
    heads_by_similarity = sorted(({"head": f"L{l}H{h}", "similarity": float(sim[l, h])}
                                  for l in range(sim.shape[0]) for h in range(sim.shape[1])),
                                 key=lambda r: r["similarity"])
    heads_by_dla = sorted((c for c in components if re.fullmatch(r"L\d+H\d+", c["component"])),
                          key=lambda r: -r["relative_change"])
    return {"attention_similarity": sim, "mean_attention_similarity": float(sim.mean()),
            "heads_by_similarity": heads_by_similarity, "dla_per_layer": per_layer, "dla_components": components,
            "heads_by_dla_change": heads_by_dla, "neurons": _neurons(pair, original, top_neurons)}


def _neurons(pair: PairStats, original: LNModel, top: int) -> dict[str, Any]:
    corr = pair.neuron_correlation()
    mean_a, mean_b = pair.neuron_means()
    w_u, _, ln = original.unembedding()
    w_u = (w_u * ln.weight if ln is not None else w_u).double()
    w_u = w_u - w_u.mean(0)  # only logit differences matter
    typical = w_u.norm() / math.sqrt(w_u.shape[1])  # the gain of a typical direction
    flat = sorted(((float(c), layer, n) for layer, cs in enumerate(corr) for n, c in enumerate(cs)),
                  key=lambda r: (r[0], -abs(mean_a[r[1]][r[2]] - mean_b[r[1]][r[2]])))
    projections = original.output_projections()
    changed = []
    for c, layer, n in flat[:top]:
        w_out = projections[layer][1].weight[:, n].double()
        w_out = w_out - w_out.mean() if ln is not None and not ln.rms else w_out  # a LayerNorm removes the mean
        ratio = (w_u @ w_out).norm() / (typical * w_out.norm()) if w_out.norm() > 0 else torch.tensor(0.0)
        changed.append({"layer": layer, "neuron": n, "correlation": c, "mean_original": float(mean_a[layer][n]),
                        "mean_model": float(mean_b[layer][n]), "unembed_ratio": float(ratio)})
    return {"mean_correlation_per_layer": [float(c.mean()) for c in corr], "changed_most": changed,
            "correlation_hist": [np.histogram(c, bins=80, range=(-1, 1))[0] for c in corr]}


def _patching(models: dict[str, LNModel], ps: PromptSet, progress: bool) -> dict[str, Any]:
    maps = {name: patch_heads(m, ps, progress) for name, m in models.items()}
    ref = maps["original"]
    H = ref["delta"].shape[1]
    change = np.abs(ref["delta"] - maps["lnfree"]["delta"])
    heads = sorted(({"head": f"L{l}H{h}", "delta_original": float(ref["delta"][l, h]),
                     "delta_lnfree": float(maps["lnfree"]["delta"][l, h]), "abs_change": float(change[l, h])}
                    for l in range(change.shape[0]) for h in range(H)), key=lambda r: -r["abs_change"])
    return {"rows": int(ps.clean.shape[0]), "models": maps,
            "correlation": {name: pearson(ref["delta"], m["delta"]) for name, m in maps.items() if name != "original"},
            "heads_by_change": heads}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---- by name: what the command line runs -----------------------------------------------------------------------
def _with_tokenizer(dirs: dict[str, Path | None]) -> dict[str, Path]:
    from ..models.io import TOKENIZER_FILES

    return {name: d for name, d in dirs.items() if d is not None and any((d / f).is_file() for f in TOKENIZER_FILES)}


def check_same_tokenizer(dirs: dict[str, Path | None]) -> None:
    """Refuse models whose own tokenizer files disagree (one line naming the pair)."""
    from ..tokenizer import load_tokenizer, tokenizer_fingerprint

    prints = {name: tokenizer_fingerprint(load_tokenizer(d)) for name, d in _with_tokenizer(dirs).items()}
    first = next(iter(prints), None)
    for name, fp in prints.items():
        if fp != prints[first]:
            raise ValueError(f"{first} ({dirs[first]}) and {name} ({dirs[name]}) have different tokenizers "
                             f"(fingerprints {prints[first]} vs {fp}); compare needs one tokenizer")


def run_compare(original: str, lnfree: str, data: str, *, vanilla: str | None = None,
                out: str | os.PathLike | None = None, prompts: list[str] | None = None, ctx: int | None = None,
                max_tokens: int | None = 16384, batch_size: int = 4, device: str | None = None,
                tokenizer: str | None = None, top_neurons: int = 20, cache_root: str | os.PathLike | None = None,
                progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Load the models (LNFREE folded if frozen), check shapes, tokenizers, data and prompt sets, then
    `compare_models`; with `out`, write report.md, report.json and the figures there."""
    from ..export.core import load_norm_free
    from ..run.config import AT_LEAST_1, check_value
    from ..sources import load_source
    from ..tokenizer import load_tokenizer
    from . import eval_data

    device = eval_data.check_eval_numbers(batch_size, max_tokens, ctx, device)
    check_value("--top-neurons", top_neurons, AT_LEAST_1)
    eval_data.check_dataset_name(data)
    sources = {"original": original, "lnfree": lnfree, **({"vanilla": vanilla} if vanilla else {})}
    models, dirs = {}, {}
    for name, source in sources.items():
        if name == "lnfree":
            try:
                src = load_norm_free(source)  # folded; refused while a norm is live
            except ValueError as e:
                if not models["original"].has_normalization:  # the norm-free model came first
                    raise ValueError(f"{e}; and {original} has no normalization — the order is ORIGINAL LNFREE: swap "
                                     "the two models") from None
                raise
            models[name], dirs[name] = src.model, src.model_dir
        else:
            models[name], where = load_source(source)
            dirs[name] = where.model_dir
    check_same_shape(models)
    check_same_tokenizer(dirs)
    own = list(_with_tokenizer(dirs).values())
    if tokenizer is None and not own:
        raise ValueError(f"no tokenizer files in {dirs['original']}; pass --tokenizer")
    tok = load_tokenizer(tokenizer or own[0])
    prompt_sets, skipped = select_prompt_sets(prompts, tok)
    cache = eval_data.load_eval_data(data, tok, cache_root=cache_root, progress=progress)
    ctx = eval_data.default_ctx(models, ctx)
    for name, model in models.items():
        eval_data.check_compatible(name, model, data, cache, ctx)
    batches, n_batches, _ = eval_data.eval_batches(cache, ctx, batch_size, max_tokens)
    for model in models.values():
        model.to(device=device, dtype=torch.float32)
    result = compare_models(models["original"], models["lnfree"], batches, vanilla=models.get("vanilla"),
                            prompt_sets=prompt_sets, top_neurons=top_neurons, total=n_batches, progress=progress)
    result = {"command": command, "models": {name: {"source": str(s), "folder": str(dirs[name]) if dirs[name] else None}
                                            for name, s in sources.items()},
              "data": {"name": data, "ctx": ctx, "max_tokens": max_tokens, "bos_prepended": False},
              "skipped_prompt_sets": skipped, **result}
    if out is not None:
        from .compare_report import write_report

        write_report(result, Path(out))
    return result
