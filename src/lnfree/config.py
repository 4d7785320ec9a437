"""Typed run configuration. Recipes (`lnfree.recipes`) fill these; the CLI overrides single fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .method.schedule import RemovalSpec
from .method.sigma import SigmaRule


@dataclass
class TrainConfig:
    """One fine-tuning (or pretraining) run."""

    steps: int = 300
    """Optimizer steps; a removal schedule written for another length is rescaled to this."""
    batch_tokens: int = 2**19
    """Tokens per optimizer step (gradient accumulation fills it from micro-batches)."""
    micro_batch: int = 8
    """Sequences per forward/backward."""
    ctx: int = 1024
    """Tokens per sequence (no BOS prepended, as in both papers)."""
    lr: float = 6e-4
    min_lr: float = 3e-4
    """Cosine decay ends here. Baroni et al. 2025 found a high floor stops loss creeping up after removal."""
    warmup_steps: int = 20
    """Linear warmup from 0: step s < warmup runs at lr · s / warmup (nanoGPT and transformers alike)."""
    decay_steps: int | None = None
    """The step at which the cosine reaches min_lr (nanoGPT's lr_decay_iters); None: `steps`. A run may stop
    before it: Heimersheim 2024 decays over 2000 steps and stops near 1200."""
    weight_decay: float = 0.01
    decay_norm_weights: bool = False
    """Weight decay on LayerNorm gains too (biases never). Matrices and embeddings are always decayed."""
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dropout: float = 0.0
    """Dropout in training forwards, where the family puts it (GPT-2: embeddings, attention, residual writes)."""
    aux_weight: float = 0.0
    """Baroni's auxiliary loss: weight × mean over tokens of (σ_t − σ̄)² at the ln_final input."""
    calibration_batches: int = 4
    seed: int = 0
    control: bool = False
    """Vanilla control: the identical run with every LayerNorm kept."""
    compile: bool = False
    activation_checkpointing: bool = False
    dtype: str = "auto"
    """"auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"."""
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    spike_factor: float = 10.0
    """Stop when a step's loss exceeds this multiple of the running median (or is not finite)."""

    def sequences_per_step(self) -> int:
        per = self.micro_batch * self.ctx
        if self.batch_tokens % per:
            lo = max(per, self.batch_tokens // per * per)
            raise ValueError(f"--batch-tokens {self.batch_tokens} is not a multiple of micro-batch × ctx = "
                             f"{self.micro_batch} × {self.ctx} = {per}; nearest valid: {lo} or {lo + per}")
        return self.batch_tokens // self.ctx

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class Recipe:
    """A named method: the removal shape plus the training settings it was published with."""

    name: str
    removal: RemovalSpec
    train: TrainConfig = field(default_factory=TrainConfig)
    sigma: SigmaRule = field(default_factory=SigmaRule)
    total_steps: int | None = None
    """Fixed run length for the depth the preset was written for (None: removal events + spec.tail)."""
    source: str = ""
