"""The `hf` export format: a clean LN-free checkpoint that plain `transformers` loads.

`LNFreeGPT2LMHeadModel` is transformers' own `GPT2LMHeadModel` with every LayerNorm replaced by `nn.Identity`
and an untied `lm_head` with a bias (where the folded final norm lives). Subclassing keeps transformers'
attention, MLP, generation and weight loading; only the three norms and the head differ. Its checkpoint keys
and Conv1D (in, out) layouts are exactly those `lnfree.models.save_model` writes for a folded model
(`architectures: ["LNFreeGPT2LMHeadModel"]`, `model_type: "lnfree_gpt2"`), so one file serves both loaders.

Why register the class with `AutoConfig` / `AutoModelForCausalLM` from `import lnfree`:
  * `trust_remote_code` + `auto_map` would put a modelling file in every checkpoint and execute code from it;
    the brief (and `lnfree.models.io`) rule that out.
  * transformers has no plugin entry point for Auto classes, so registration must run in-process.
  * an explicit `lnfree.export.hf.register()` call is easy to forget, and `from_pretrained` then fails with
    "model type lnfree_gpt2 not recognised".
  * registering eagerly inside `lnfree/__init__.py` would import transformers' modelling stack on every
    `import lnfree` — measured +3.5 s here (`lnfree schedule` 0.12 s → 5 s).
So `lnfree.export` installs a post-import hook: this module is imported (and registers) as soon as transformers'
Auto machinery has finished loading, or at once if it already has. After `import lnfree`,
`AutoModelForCausalLM.from_pretrained(DIR)` just works; nothing transformers-related is imported until needed.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ..models.gpt2 import GPT2, NOLN_ARCHITECTURE, NOLN_MODEL_TYPE, to_hf

__all__ = ["LNFreeGPT2Config", "LNFreeGPT2LMHeadModel", "register", "to_hf_model"]


class LNFreeGPT2Config(GPT2Config):
    """GPT-2's config under its own model_type; the head is untied and nothing normalises."""

    model_type = NOLN_MODEL_TYPE
    tie_word_embeddings: bool = False
    normalization: bool = False


class LNFreeGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT2LMHeadModel whose ln_1 / ln_2 / ln_f are identities and whose lm_head is untied, with a bias."""

    config_class = LNFreeGPT2Config
    _tied_weights_keys: dict[str, str] = {}  # the head is a separate, folded matrix

    def __init__(self, config: LNFreeGPT2Config):
        super().__init__(config)
        for block in self.transformer.h:
            block.ln_1 = nn.Identity()
            block.ln_2 = nn.Identity()
        self.transformer.ln_f = nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)  # (V, D) + (V,)
        self.post_init()


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` resolve model_type `lnfree_gpt2` (idempotent)."""
    AutoConfig.register(NOLN_MODEL_TYPE, LNFreeGPT2Config, exist_ok=True)
    AutoModelForCausalLM.register(LNFreeGPT2Config, LNFreeGPT2LMHeadModel, exist_ok=True)


def to_hf_model(model: GPT2) -> LNFreeGPT2LMHeadModel:
    """Our folded GPT-2 → an equivalent `LNFreeGPT2LMHeadModel` in memory (fp32 copy of the weights, eval)."""
    if model.has_normalization:
        raise ValueError("to_hf_model needs a norm-free (folded) model; call model.fold() first")
    hf_config, state = to_hf(model)
    config = LNFreeGPT2Config(**{k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")})
    config.architectures = [NOLN_ARCHITECTURE]
    out = LNFreeGPT2LMHeadModel(config).eval()
    missing, unexpected = out.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    # transformers' GPT-2 keeps no persistent buffers, so every parameter must come from our state dict.
    if missing or unexpected:
        raise RuntimeError(f"LNFreeGPT2LMHeadModel layout drifted: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return out


register()
