"""The measurements `lnfree compare` takes on every batch (what they mean: `compare.py`'s docstring): direct logit
attribution to the correct token, the statistics that compare two models' figures (Pearson, relative change,
calibration error, attention Jensen–Shannon), and the accumulators that gather them batch by batch — per model
(`ModelStats`) and per (original, model) pair (`PairStats`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.base import LNModel
from .evaluate import token_cross_entropy

ECE_BINS = 15


# ---- direct logit attribution ------------------------------------------------------------------------------------
def token_dla(model: LNModel, cache: dict[str, Tensor], idx: Tensor) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """(component names, DLA (N, B, T−1), bias term (B, T−1), direct effect (N, B, T−1)) to each correct next token,
    measured against the vocabulary mean (see `compare.py`'s docstring)."""
    names, comps = model.residual_components(cache)
    comps = comps[:, :, :-1]  # (N, B, T−1, D): the positions that have a next token
    resid = cache[f"blocks.{model.n_layers - 1}.hook_resid_post"][:, :-1]  # (B, T−1, D)
    w_u, b_u, ln = model.unembedding()
    target = idx[:, 1:]
    u = w_u[target] - w_u.mean(0)  # (B, T−1, D)
    bias = torch.zeros(target.shape, dtype=u.dtype, device=u.device) if b_u is None else b_u[target] - b_u.mean()
    if ln is None:  # norm-free: the read-out is linear, attribution is the direct effect
        dla = torch.einsum("nbtd,btd->nbt", comps, u)
        return names, dla, bias, dla
    if ln.bias is not None:
        bias = bias + u @ ln.bias
    w = u * ln.weight  # γ
    w = w if ln.rms else w - w.mean(-1, keepdim=True)  # centring moved onto the read-out direction
    site = ln.sites[0]
    B, T = idx.shape
    if site.is_frozen:
        divisor = site.frozen_divisor(B, T, model.eot_mask(idx))
        divisor = divisor[:, :-1, 0] if divisor.dim() == 3 else divisor.expand(B, T - 1)
    else:
        divisor = ln.input_std(resid)  # (B, T−1): frozen at each token's own value
    dla = torch.einsum("nbtd,btd->nbt", comps, w) / divisor
    final = lambda x: ln.centred(x) / (divisor.unsqueeze(-1) if site.is_frozen else ln.input_std(x).unsqueeze(-1))
    read = lambda x: (final(x) * (u * ln.weight)).sum(-1)  # centred logit of the correct token, less β's part
    de = read(resid) - torch.cat([read(resid - part) for part in comps.split(16)])  # 16 components at a time
    return names, dla, bias, de


# ---- statistics ------------------------------------------------------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation in float64; 1.0 for identical inputs, nan when one is constant and they differ."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.array_equal(a, b):
        return 1.0
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(np.clip((a @ b) / den, -1.0, 1.0)) if den > 0 else float("nan")


def relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """rms(a − b) / sqrt((ms(a) + ms(b)) / 2): 0 unchanged, ~1.4 unrelated, 2 sign-flipped."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = math.sqrt((np.mean(a * a) + np.mean(b * b)) / 2)
    return float(math.sqrt(np.mean((a - b) ** 2)) / den) if den > 0 else 0.0


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS):
    """(ECE, reliability rows {lo, hi, n, confidence, accuracy}) over equal-width confidence bins."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for k in range(bins):
        sel = which == k
        n = int(sel.sum())
        conf = float(confidence[sel].mean()) if n else None
        acc = float(correct[sel].mean()) if n else None
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        rows.append({"lo": k / bins, "hi": (k + 1) / bins, "n": n, "confidence": conf, "accuracy": acc})
    return ece, rows


def js_per_head(p: Tensor, q: Tensor) -> Tensor:
    """Sum over batch and query rows ≥ 1 of the Jensen–Shannon divergence (nats) of two (B, H, T, T) patterns → (H,).
    Identical rows give exactly 0."""
    p, q = p[:, :, 1:], q[:, :, 1:]
    m = (p + q) / 2
    kl = lambda x: torch.where(x > 0, x * (x.log() - m.log()), torch.zeros_like(x)).sum(-1)
    return (0.5 * (kl(p) + kl(q))).double().sum(dim=(0, 2))  # rows in the patterns' precision, their sum in fp64


class PairStats:
    """Attention and neuron statistics of a (reference, model) pair, accumulated batch by batch."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.js: list[Tensor | float] = [0.0] * n_layers
        self.rows = 0
        self.neurons: list[dict[str, Tensor]] = [{} for _ in range(n_layers)]

    def add(self, ref: dict[str, Tensor], cache: dict[str, Tensor]) -> None:
        for i in range(self.n_layers):
            p, q = ref[f"blocks.{i}.attn.hook_pattern"], cache[f"blocks.{i}.attn.hook_pattern"]
            self.js[i] = self.js[i] + js_per_head(p, q).cpu()
            a = ref[f"blocks.{i}.mlp.hook_post"].flatten(0, 1).double()  # (tokens, d_mlp)
            b = cache[f"blocks.{i}.mlp.hook_post"].flatten(0, 1).double()
            sums = {"n": torch.tensor(float(a.shape[0])), "a": a.sum(0), "b": b.sum(0), "aa": (a * a).sum(0),
                    "bb": (b * b).sum(0), "ab": (a * b).sum(0), "dd": ((a - b) ** 2).sum(0)}
            acc = self.neurons[i]
            for k, v in sums.items():
                acc[k] = acc[k] + v.cpu() if k in acc else v.cpu()
        p = ref["blocks.0.attn.hook_pattern"]
        self.rows += p.shape[0] * (p.shape[2] - 1)

    def attention_similarity(self) -> np.ndarray:
        """(L, H): 1 − mean JS / ln 2."""
        return np.stack([1.0 - (js / max(self.rows, 1)).numpy() / math.log(2) for js in self.js])

    def neuron_correlation(self) -> list[np.ndarray]:
        """Per layer, (d_mlp,) Pearson correlation over tokens; 1 where the activations are identical."""
        out = []
        for s in self.neurons:
            n = s["n"]
            cov = s["ab"] / n - (s["a"] / n) * (s["b"] / n)
            va, vb = s["aa"] / n - (s["a"] / n) ** 2, s["bb"] / n - (s["b"] / n) ** 2
            corr = (cov / (va * vb).clamp_min(1e-300).sqrt()).clamp(-1, 1)
            corr = torch.where((va > 0) & (vb > 0), corr, torch.zeros_like(corr))
            out.append(torch.where(s["dd"] == 0, torch.ones_like(corr), corr).numpy())
        return out

    def neuron_means(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return ([(s["a"] / s["n"]).numpy() for s in self.neurons], [(s["b"] / s["n"]).numpy() for s in self.neurons])


class ModelStats:
    """Per-token outputs and attributions of one model, accumulated batch by batch."""

    def __init__(self) -> None:
        self.ce, self.entropy, self.confidence, self.correct, self.argmax, self.dla = [], [], [], [], [], []
        self.de_num = self.de_den = 0.0
        self.names: list[str] = []

    def add(self, model: LNModel, logits: Tensor, cache: dict[str, Tensor], idx: Tensor) -> None:
        log_p = F.log_softmax(logits[:, :-1].float(), -1)  # (B, T−1, V)
        target = idx[:, 1:]
        self.ce.append(token_cross_entropy(logits, idx).cpu())
        self.entropy.append(-(log_p.exp() * log_p).sum(-1).cpu())
        conf, top = log_p.max(-1)
        self.confidence.append(conf.exp().cpu())
        self.argmax.append(top.cpu())
        self.correct.append((top == target).cpu())
        self.names, dla, _, de = token_dla(model, cache, idx)
        self.dla.append(dla.flatten(1).cpu())  # (N, B·(T−1))
        self.de_num += (dla - de).abs().sum().item()
        self.de_den += de.abs().sum().item()

    def arrays(self) -> dict[str, np.ndarray]:
        cat = lambda xs: torch.cat([x.reshape(x.shape[0], -1) for x in xs]).numpy()
        return {"ce": cat(self.ce), "entropy": cat(self.entropy).ravel(), "confidence": cat(self.confidence).ravel(),
                "correct": cat(self.correct).ravel(), "argmax": cat(self.argmax).ravel(),
                "dla": torch.cat(self.dla, dim=1).numpy()}
