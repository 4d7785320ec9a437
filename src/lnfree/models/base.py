"""The family interface: everything the LN-removal method may know about a model.

A family module (gpt2.py, later neox.py, llama.py …) provides
  * a model class deriving from `LNModel` whose LayerNorms are `RemovableLayerNorm`s, whose `forward` takes
    token ids (B, T) and returns logits (B, T, V) — plus, when asked, the per-token std of the final norm's
    input (Baroni's auxiliary loss) and a TransformerLens-named activation cache —, and whose `fold()` returns
    the norm-free twin of a fully frozen model;
  * a `Family` record that converts to and from the `transformers` checkpoint format.
The method (schedule, calibration, training) talks to models only through this file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from ..method.sigma import SigmaRule
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

    def eot_mask(self, idx: Tensor) -> Tensor | None:
        """(B, T) bool: positions holding the end-of-text token (they may get a special σ̂)."""
        eot = getattr(self.config, "eos_token_id", None)
        return None if eot is None else idx == eot

    @contextlib.contextmanager
    def collect_norm_stats(self) -> Iterator[None]:
        """Record per-token std at live sites for the forwards run inside this block (training forwards only).

        Backward runs outside the block, so activation-checkpoint recomputes are not counted.
        """
        layers = self.norm_layers()
        for layer in layers:
            layer.collecting = True
        try:
            yield
        finally:
            for layer in layers:
                layer.collecting = False

    def set_sigma_rule(self, rule: SigmaRule, micro_batches_per_step: int | None = None) -> None:
        """How σ̂ is measured and followed (method/sigma.py). With `micro_batches_per_step`, a "call" rule
        moves σ̂ inside every training forward; without, statistics wait for `ema_step` (calibration)."""
        for layer in self.norm_layers():
            layer.rule = rule
            per_call = rule.ema == "call" and rule.collects and micro_batches_per_step
            layer.call_momentum = (rule.call_momentum(micro_batches_per_step, rule.reads(layer.paths))
                                   if per_call else None)

    def ema_step(self, momentum: float) -> None:
        """Fold the collected std into σ̂ at every tracked site (once per optimizer step, "step" rule)."""
        for layer in self.norm_layers():
            layer.ema_step(momentum)

    def set_dropout(self, p: float) -> None:
        """Dropout probability of training forwards, wherever the family places dropout (GPT-2: embeddings,
        attention weights, both residual writes). Evaluation forwards never drop."""
        for module in self.modules():
            if hasattr(module, "dropout_p"):
                module.dropout_p = p

    # ---- to be provided by the family -----------------------------------------------------------------------
    def forward(self, idx: Tensor, *, cache: dict | None = None, return_final_std: bool = False):
        raise NotImplementedError

    def fold(self) -> LNModel:
        """A norm-free model computing the same function; requires every site frozen with no specials."""
        raise NotImplementedError

    def check_foldable(self) -> None:
        """Raise a one-line error naming the sites that still normalise per token or keep a special σ̂."""
        live = [n for n, s in self.norm_sites().items() if not s.is_frozen]
        special = [n for n, s in self.norm_sites().items() if s.is_frozen and (s.bos_weight > 0 or s.eot_weight > 0)]
        if live:
            raise ValueError(f"cannot fold: {len(live)} site(s) still live ({', '.join(live[:4])}…); "
                             "finish the removal schedule first")
        if special:
            raise ValueError(f"cannot fold: {len(special)} site(s) still use a position-0/EOT special σ̂ "
                             f"({', '.join(special[:4])}…); run the schedule past its special-σ̂ removal")


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
