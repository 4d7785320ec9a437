"""The `hf-compat` export format: a plain `GPT2LMHeadModel` that any GPT-2 tool loads with zero extra code.

It uses the convention of the published LN-free GPT-2s (apollo-research/gpt2_noLN, schaeff/gpt2-*_LNFree*):
every LayerNorm keeps its module but gets eps = 1e12 and weight = sqrt(eps) = 1e6, so that

    LN(x) = (x − mean(x)) / sqrt(var(x) + 1e12) · 1e6 + b  ≈  (x − mean(x)) + b

(relative deviation var / 2e12: < 5e-7 while the residual std stays below 1e3; in fp32 `var + 1e12` rounds to
exactly 1e12 while var < 6.5e4, i.e. std < 256, so there the LN is exact centring up to one rounding of 1e-6).
Our folded weights already contain γ/σ̂ and the centring, so ln_1 / ln_2 are pure centring: weight 1e6, bias 0.

The head. GPT-2 ties lm_head to wte and has no head bias, while the folded model has an untied head
W_U' = wte · diag(g) · C (g = γ_f/σ̂_f, C the centring matrix) and bias b_U = wte · β_f. We keep the Apollo
trick: ln_f carries the unfolded final norm, weight g · 1e6 and bias β_f, and the head stays tied, so

    logits = ln_f(x) · wteᵀ = wte · diag(g) · C · x + wte · β_f      (exactly the folded head).

g and β_f are recovered from (wte, W_U', b_U) by least squares in float64 — a D×D normal system, unique
whenever no two columns of wte are parallel — and the reconstruction is checked. A head that is not of this
form (e.g. trained untied after folding) cannot be expressed by a tied GPT-2: we refuse and point to `hf`.
(An untied GPT2LMHeadModel could express any head, with lm_head = W_U' + b_U·1ᵀ/D and ln_f bias = 1, but
readers that assume GPT-2's tying — lnfree's own loader among them — would silently drop that head.)

Precision, measured (CPU, torch 2.13, random-weight models; max-abs logit error against the folded model
evaluated in fp32; the exports are loaded with `AutoModelForCausalLM.from_pretrained(dir, dtype=...)`):

  model                                   dtype   hf        hf-compat
  tiny 2L×48, |logits| ≤ 3.4               fp32    8.3e-7    2.3e-6
                                           bf16    3.3e-2    3.0e-2
                                           fp16    4.7e-3    NaN
  GPT-2-small shape 12L×768, V=50257,      fp32    5.2e-4    8.2e-4   (fp32 itself is 7.6e-4 off fp64 here)
  |logits| ≤ 262, residual std ≤ 14        bf16    7.9       8.4      (top-1 agreement 0.94 / 0.96)
                                           fp16    1.8       NaN

  * fp16 is not supported: the LN weights 1e6 exceed fp16's maximum 65504, become inf, and every logit is NaN.
    Use the `hf` format (no LN weights at all) for fp16.
  * bf16 stores 1e6 as 999424 (−5.8e-4 relative on every LN output), well inside bf16's own rounding.
  * The function itself (both sides evaluated in float64 from the stored weights, the export gate) differs by
    1.2e-5 on the GPT-2-small-shaped model (hf: 3e-12): the var/2e12 term plus the fp32 rounding of the
    recovered ln_f gain. In fp32 arithmetic the var term does not even occur while var < 65536 (1e12 + var
    rounds to 1e12). On synthetic models with a large position-0 outlier the term stayed 40–60× below fp32's
    own rounding error, but it can exceed the 1e-4 gate (0.97 where |logits| reach 1.5e3 and fp32 alone is
    off by 43); such an export is refused with a pointer to `hf`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from ..models.gpt2 import GPT2

__all__ = ["COMPAT_EPS", "HeadNotTiedError", "to_compat_hf", "untie_head"]

COMPAT_EPS = 1e12  # the published convention; LN weights are sqrt(COMPAT_EPS) = 1e6
# Largest relative reconstruction residual of the tied head that we still call exact (fp32 rounding of the
# fold itself is ~1e-7 relative).
_TIE_RTOL = 1e-5


class HeadNotTiedError(ValueError):
    """The folded lm_head is not wte · diag(g) · C (+ wte · β): a tied GPT-2 cannot express it."""


@torch.no_grad()
def untie_head(wte: Tensor, w_u: Tensor, b_u: Tensor) -> tuple[Tensor, Tensor, float]:
    """Recover the final norm's folded gain g (D,) and bias β (D,) from wte (V, D), W_U' (V, D), b_U (V,).

    Solves min_g ||wte diag(g) C − W_U'||_F (normal equations A g = r with A = diag(‖w_j‖²) − wteᵀwte / D,
    r_j = w_jᵀ W_U'[:, j]) and β = argmin ||wte β − b_U||, all in float64. Returns (g, β, relative residual).
    """
    E, W, b = wte.double(), w_u.double(), b_u.double()  # (V, D), (V, D), (V,)
    D = E.shape[1]
    gram = E.T @ E  # (D, D)
    A = torch.diag(torch.diagonal(gram)) - gram / D
    r = (E * W).sum(0)  # (D,)
    g = torch.linalg.solve(A, r)
    beta = torch.linalg.lstsq(E, b.unsqueeze(1)).solution.squeeze(1)  # (D,)
    M = E * g
    rebuilt = M - M.mean(dim=1, keepdim=True)  # wte diag(g) C
    scale = W.abs().max().clamp_min(1e-30)
    residual = max((rebuilt - W).abs().max().item() / scale.item(),
                   (E @ beta - b).abs().max().item() / b.abs().max().clamp_min(scale).item())
    return g, beta, residual


@torch.no_grad()
def to_compat_hf(model: GPT2, eps: float = COMPAT_EPS) -> GPT2LMHeadModel:
    """Folded GPT-2 → a stock `GPT2LMHeadModel` (tied head, every LN eps=1e12 / weight 1e6), fp32, eval.

    Raises HeadNotTiedError when the folded head cannot be expressed through the tied embedding.
    """
    if model.has_normalization:
        raise ValueError("hf-compat export needs a norm-free (folded) model; call model.fold() first")
    cfg = model.config
    g, beta, residual = untie_head(model.wte.weight, model.lm_head.weight, model.lm_head.bias)
    if not residual <= _TIE_RTOL:
        raise HeadNotTiedError(f"hf-compat needs the lm_head to be the folded tied embedding (wte·diag(g)·C); "
                               f"this head differs from that by {residual:.1e} (relative), so a GPT-2 with a "
                               "tied head cannot express it; use --format hf")
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
                        activation_function=cfg.activation_function, layer_norm_epsilon=eps,
                        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    hf_cfg.architectures = ["GPT2LMHeadModel"]
    out = GPT2LMHeadModel(hf_cfg).eval()
    unit = math.sqrt(eps)  # LN weight that cancels the 1/sqrt(eps) divisor
    t = out.transformer
    t.wte.weight.copy_(model.wte.weight)
    t.wpe.weight.copy_(model.wpe.weight)
    for src, dst in zip(model.h, t.h, strict=True):
        for ln in (dst.ln_1, dst.ln_2):
            ln.weight.fill_(unit)
            ln.bias.zero_()
        # nn.Linear (out, in) → Conv1D (in, out)
        for a, b in ((src.attn.c_attn, dst.attn.c_attn), (src.attn.c_proj, dst.attn.c_proj),
                     (src.mlp.c_fc, dst.mlp.c_fc), (src.mlp.c_proj, dst.mlp.c_proj)):
            b.weight.copy_(a.weight.t())
            b.bias.copy_(a.bias)
    t.ln_f.weight.copy_((g * unit).to(t.ln_f.weight.dtype))
    t.ln_f.bias.copy_(beta.to(t.ln_f.bias.dtype))
    return out
