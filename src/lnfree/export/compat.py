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

from typing import Any

from ..method.fold import COMPAT_EPS, HeadNotTiedError, untie_head
from ..models import FAMILIES
from ..models.base import LNModel

__all__ = ["COMPAT_EPS", "HeadNotTiedError", "to_compat_hf", "untie_head"]


def to_compat_hf(model: LNModel, eps: float | None = None) -> Any:
    """A folded model → its family's stock transformers class in the large-eps convention (fp32, eval): GPT-2's
    published eps = 1e12 (`COMPAT_EPS`), or the family's own default (`WIDE_COMPAT_EPS` beyond GPT-2)."""
    family = FAMILIES[model.family].hf()
    return family.to_compat_hf(model) if eps is None else family.to_compat_hf(model, eps)
