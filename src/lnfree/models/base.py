"""The family interface: everything the LN-removal method may know about a model.

A family module (gpt2.py, later neox.py, llama.py …) provides
  * a model class deriving from `LNModel` whose LayerNorms are `RemovableLayerNorm`s, whose `forward` takes
    token ids (B, T) and returns logits (B, T, V) — plus, when asked, the per-token std of the final norm's
    input (Baroni's auxiliary loss) and a TransformerLens-named activation cache —, and whose `norm_reads()`
    says which linear maps read each norm (one generic `fold()` in method/fold.py builds the norm-free twin);
  * a `Family` record that converts to and from the `transformers` checkpoint format.
The method (schedule, calibration, training) talks to models only through this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..method.fold import NormRead, fold_model
from ..method.schedule import SiteSpec
from ..method.sites import NormSite, RemovableLayerNorm


class LNModel(nn.Module):
    """Base class of every family's model. Subclasses set `self.config` (with `eos_token_id`)."""

    config: object
    family: str
    gradient_checkpointing: bool = False  # recompute each block in backward to save activation memory

    # ---- sites --------------------------------------------------------------------------------------------
    def norm_layers(self) -> list[RemovableLayerNorm]:
        return [m for m in self.modules() if isinstance(m, RemovableLayerNorm)]

    def norm_sites(self) -> dict[str, NormSite]:
        """Every site by name, in forward order (e.g. blocks.0.ln1.qk, blocks.0.ln1.v, blocks.0.ln2 …)."""
        return {site.name: site for layer in self.norm_layers() for site in layer.sites}

    @property
    def has_normalization(self) -> bool:
        return bool(self.norm_layers())

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-text ids (Llama 3 declares several); empty when the config names none."""
        eos = getattr(self.config, "eos_token_id", None)
        return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)

    def eot_mask(self, idx: Tensor) -> Tensor | None:
        """(B, T) bool: positions holding an end-of-text token (they may get a special σ̂)."""
        ids = self.eos_token_ids
        if not ids:
            return None
        return idx == ids[0] if len(ids) == 1 else torch.isin(idx, torch.tensor(ids, device=idx.device))

    def run_block(self, block: nn.Module, *args: Any, cache: dict | None = None) -> Any:
        """Call a transformer block, recomputing it in backward when `gradient_checkpointing` is on (training
        forwards without an activation cache only). Families run every block through this."""
        if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
            return checkpoint(block, *args, None, use_reentrant=False)
        return block(*args, cache)

    def set_dropout(self, p: float) -> None:
        """Dropout probability of training forwards, wherever the family places dropout (GPT-2: embeddings,
        attention weights, both residual writes). Evaluation forwards never drop."""
        for module in self.modules():
            if hasattr(module, "dropout_p"):
                module.dropout_p = p

    def transformer_blocks(self) -> nn.ModuleList:
        """The repeated blocks (FSDP2 shards each): the model's ModuleList of `n_layers` modules; a family with
        another layout overrides this."""
        found = [m for m in self.children() if isinstance(m, nn.ModuleList) and len(m) == self.n_layers]
        if len(found) != 1:
            raise NotImplementedError(f"{type(self).__name__}: say which ModuleList holds the blocks")
        return found[0]

    # ---- to be provided by the family -----------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Transformer blocks (what a removal schedule lays its phases over)."""
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        """The longest sequence the model reads (positions)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def site_layout(self) -> list[SiteSpec]:
        """Every norm site with the kind that orders it in a schedule, in forward order (the order the family
        registers its norms in); the names are those of `norm_sites()`."""
        return [site.spec for site in self.norm_sites().values()]

    def forward(self, idx: Tensor, *, cache: dict | None = None, return_final_std: bool = False):
        raise NotImplementedError

    def output_projections(self) -> list[tuple[nn.Module, nn.Module]]:
        """Per block, (attention output projection, MLP output projection): their inputs are the heads' outputs
        (B, T, H·d_head) and the MLP neurons' activations — where `lnfree compare` reads and patches."""
        raise NotImplementedError

    def residual_components(self, cache: dict[str, Tensor]) -> tuple[list[str], Tensor]:
        """(names, (N, B, T, D)): every write to the final residual stream (`blocks.{n−1}.hook_resid_post`),
        from a `forward(cache=…)` — they sum to it exactly. Direct logit attribution reads these."""
        raise NotImplementedError

    def unembedding(self) -> tuple[Tensor, Tensor | None, RemovableLayerNorm | None]:
        """(W_U (V, D), b_U (V,) or None, the final norm layer or None once folded)."""
        raise NotImplementedError

    def architecture_rows(self) -> list[tuple[str, object]]:
        """(name, value) rows describing the architecture, for model cards."""
        raise NotImplementedError

    def plant_position0_writer(self, scale: float) -> None:
        """The harder offline analog's planted position-0 outlier (`lnfree demo --hard`), where a family has one."""
        raise ValueError(f"the harder analog (--hard) is available for GPT-2 only, not {self.family}")

    def norm_reads(self, twin: LNModel) -> list[NormRead]:
        """Which linear map reads which path of which norm, and which module of the norm-free `twin` (this class
        built with `normalization=False`) receives it folded — all a family declares for `fold()`."""
        raise NotImplementedError

    def fold(self) -> LNModel:
        """A norm-free model computing the same function; requires every site frozen with no specials."""
        return fold_model(self)



@dataclass(frozen=True)
class Family:
    """How one model family maps to `transformers` checkpoints."""

    name: str
    # `config.json` "architectures" / "model_type" values this family reads.
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    # (hf config dict, state dict of tensors) -> model
    from_hf: Callable[[dict, dict[str, Tensor]], LNModel]
    # model -> (hf config dict, state dict of tensors) in the family's native layout
    to_hf: Callable[[LNModel], tuple[dict, dict[str, Tensor]]]
    # hf config dict -> freshly initialised model (run checkpoints then load our own state dict into it)
    build: Callable[[dict], LNModel]
    # model -> its hf config dict
    config_dict: Callable[[LNModel], dict]
    # the module (imported on demand: it imports transformers' modelling code) that defines the family's
    # norm-free transformers class(es) and registers them with the Auto classes, and provides classes(model) →
    # (what the `hf` / `hf-compat` exports reload as, TransformerLens' adapter), to_hf_model(model),
    # to_compat_hf(model, eps) and tl_norm_count(model) (the norm bridges that adapter creates)
    hf_module: str
    # (vocab_size, context, d_model, n_layers, n_heads, eos_token_id, seed) -> a freshly initialised small model
    # with every norm live (pretraining the offline analogs)
    new_model: Callable[[int, int, int, int, int, int | None, int], LNModel]
    # whether a head's width must be even (a rotary embedding over the whole head: Llama, Qwen)
    even_head_dim: bool = False

    def hf(self) -> ModuleType:
        return importlib.import_module(self.hf_module)
