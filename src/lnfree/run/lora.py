"""Parameter-efficient removal: LoRA adapters (peft) on a model's linear maps, the base weights frozen.

With `--lora R` a run trains, instead of every weight, a rank-R update B·A (scaled by alpha / R) on each targeted
linear map of the blocks, plus the parameters `--lora-trainable` names (by default the norm layers' own: γ, and
LayerNorm's β — a few thousand numbers, the ones folded into the next linear map at the end). The base weights never
change, so a checkpoint holds only what trains (adapters, those parameters, and the σ̂ buffers); a resume rebuilds
the base from the run's model source. The finished model merges every adapter into its weight (W += scale · B·A) and
unwraps it, so `fold`, `verify`, every export, `compare` and `eval` see an ordinary model.

The adapters are peft's own `lora.Linear` (`inject_adapter_in_model` on our modules); a family that slices a
packed projection's rows reads the adapter through `models.common.linear_weights`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.base import LNModel

TRAINABLE_KINDS = ("none", "norms", "biases", "embeddings")


def trainable_kinds(text: str) -> set[str]:
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    unknown = kinds - set(TRAINABLE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"--lora-trainable {text!r}: choose a comma list of {', '.join(TRAINABLE_KINDS)}")
    return kinds - {"none"}


def target_names(model: nn.Module, targets: str) -> list[str]:
    """The linear maps of the blocks to adapt: every one ("all"), or those whose own name is in the comma list
    (e.g. "q_proj,v_proj", "c_attn"). The unembedding is never adapted (it is tied to the embedding in most
    models)."""
    in_blocks = {id(m) for block in model.transformer_blocks() for m in block.modules()}
    linears = [(name, name.rsplit(".", 1)[-1]) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m) in in_blocks]
    if targets == "all":
        return [name for name, _ in linears]
    wanted = {t.strip() for t in targets.split(",") if t.strip()}
    unknown = wanted - {short for _, short in linears}
    if unknown or not wanted:
        known = ", ".join(sorted({short for _, short in linears}))
        raise ValueError(f"--lora-targets {targets!r}: no linear map named {', '.join(sorted(unknown)) or '(none)'} "
                         f"in this model's blocks; choose all or a comma list of {known}")
    return [name for name, short in linears if short in wanted]


def add_adapters(model: LNModel, rank: int, alpha: float | None, targets: str, trainable: str, seed: int) -> None:
    """Wrap the targeted linear maps in LoRA adapters (A drawn from `seed`, B zero: the model computes exactly what
    it did) and leave trainable only the adapters and the `trainable` kinds of parameter."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("--lora needs peft: pip install 'lnfree[lora]' (or pip install peft)") from None
    kinds = trainable_kinds(trainable)
    names = target_names(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=names,
                        lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    extra = set()
    if "norms" in kinds:
        extra |= {id(p) for layer in model.norm_layers() for p in layer.parameters()}
    if "embeddings" in kinds:
        extra |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        bias = "biases" in kinds and name.endswith(".bias")
        p.requires_grad_(".lora_" in name or id(p) in extra or bias)


def has_adapters(model: nn.Module) -> bool:
    return any(_is_adapter(m) for m in model.modules())


def _is_adapter(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "merge")


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters a LoRA run never changes (none in a run without adapters): checkpoints skip them."""
    if not has_adapters(model):
        return set()
    return {name for name, p in model.named_parameters() if not p.requires_grad}


@torch.no_grad()
def merge_adapters(model: LNModel) -> LNModel:
    """Fold every adapter into its weight (W += scale · B·A) and put the plain linear map back, every parameter
    trainable again: an ordinary model, named as before the adapters."""
    for name, module in list(model.named_modules()):
        if not _is_adapter(module):
            continue
        module.merge()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict) -> dict:
    """`merge_adapters` on a full state dict of `model` (gathered from FSDP2 shards): every adapted map's weight
    W + scale · B·A under its plain name, the adapter entries dropped."""
    out = dict(state)
    for name, module in model.named_modules():
        if not _is_adapter(module):
            continue
        for adapter in module.active_adapters:
            a, b = out.pop(f"{name}.lora_A.{adapter}.weight"), out.pop(f"{name}.lora_B.{adapter}.weight")
            key = f"{name}.base_layer.weight"
            out[key] = out[key] + module.scaling[adapter] * (b.float() @ a.float()).to(out[key].dtype)
        for key in [k for k in out if k.startswith(f"{name}.base_layer.")]:
            out[f"{name}.{key[len(name) + len('.base_layer.'):]}"] = out.pop(key)
    return out


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
