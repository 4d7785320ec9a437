"""Where a forward stops being finite: the first norm site, in forward order, whose output is not finite.

A frozen site divides by one σ̂ measured on ordinary tokens; a token whose std is far above it (a real model's
position 0, ~170× the median in SmolLM2-135M's middle blocks, or a few whitespace tokens in its early blocks) leaves
the site much larger than any live norm would let it, and SwiGLU or GELU MLPs grow it further block after block
until fp32 overflows. Training and evaluation read this only after a loss came back non-finite, so finite runs pay
nothing for it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..models.base import LNModel
from .sites import RemovableLayerNorm


@torch.no_grad()
def first_nonfinite_site(model: LNModel, idx: Tensor, autocast: contextlib.AbstractContextManager | None = None
                         ) -> str | None:
    """One forward of `idx` (B, T); a one-line account of the first site whose output is not finite (its state,
    σ̂, and how far its input's std was above σ̂ there), or of the residual stream being non-finite before it;
    None when every site's output is finite."""
    found: list[str] = []

    def look(layer: RemovableLayerNorm, inputs: tuple, outputs: list[Tensor]) -> None:
        if found:
            return
        x = inputs[0]
        if not torch.isfinite(x).all():
            found.append(f"the input of {layer.sites[0].name} is already not finite (the model's own weights or an "
                         "earlier non-norm overflow)")
            return
        for site, out in zip(layer.sites, outputs, strict=True):
            if torch.isfinite(out).all():
                continue
            std = layer.input_std(x.float())  # (B, T, [H])
            position = int(torch.nonzero(std == std.max())[0, 1])
            sigma = site.sigma.float().max().item()
            state = "frozen" if site.is_frozen else "live"
            found.append(f"{site.name} ({state}, σ̂ {sigma:.3g}) is the first site whose output is not finite; "
                         f"its input's std reaches {std.max().item():.3g} at position {position} "
                         f"({std.max().item() / sigma:.3g}× σ̂)")
            return

    hooks = [layer.register_forward_hook(look) for layer in model.norm_layers()]
    was_training = model.training
    model.eval()
    try:
        with autocast or contextlib.nullcontext():
            logits = model(idx)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if found:
        return found[0]
    return None if torch.isfinite(logits).all() else "every norm site's output is finite; the logits are not"
