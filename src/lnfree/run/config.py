"""Typed run configuration. Recipes (`lnfree.run.recipes`) fill these; the CLI overrides single fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..method.schedule import RemovalSpec
from ..method.sigma import SigmaRule


def _opt(default, help: str, **kw):
    """A field with the help text the command line shows (`lnfree remove --help` lists every field)."""
    return field(default=default, metadata={"help": help}, **kw)


# Fields a `--resume` may change: they decide where and how often things are written or measured, never what
# the optimizer does.
RESUME_SAFE = ("checkpoint_every", "keep_checkpoints", "eval_every", "eval_tokens", "device", "fsdp", "dist_timeout")
DTYPES = ("auto", "fp32", "bf16")
# σ̂-rule settings a command line may override (flag name -> SigmaRule field); the rest comes from the preset.
SIGMA_OVERRIDES = {"ema_momentum": "momentum"}
# Settings whose flag is not their name with dashes.
FLAG_NAMES = {"warmup_steps": "--warmup", "lora_rank": "--lora"}


def flag(name: str) -> str:
    """The command-line flag of a setting: batch_tokens -> --batch-tokens."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class Range:
    """The valid values of a number; None: unbounded on that side. NaN is in no range."""

    low: float
    high: float | None = None
    low_open: bool = False  # low itself is not valid
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        return above and (self.high is None or (v < self.high if self.high_open else v <= self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'more than' if self.low_open else 'at least'} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, FRACTION = Range(0), Range(1), Range(0, low_open=True), Range(0, 1, high_open=True)
# What each numeric setting may be: a value outside is refused before anything is read or written, rather than
# run silently wrong (a negative warmup ran with none, keep -1 kept every checkpoint) or failing later.
SETTING_RANGES = {
    "steps": AT_LEAST_1, "batch_tokens": AT_LEAST_1, "micro_batch": AT_LEAST_1, "ctx": Range(2), "lr": POSITIVE,
    "min_lr": AT_LEAST_0, "warmup_steps": AT_LEAST_0, "decay_steps": AT_LEAST_1, "weight_decay": AT_LEAST_0,
    "betas": FRACTION, "grad_clip": POSITIVE, "dropout": FRACTION, "aux_weight": AT_LEAST_0,
    "distill_weight": AT_LEAST_0,
    "calibration_batches": AT_LEAST_1, "seed": AT_LEAST_0, "dist_timeout": POSITIVE, "checkpoint_every": AT_LEAST_0,
    "keep_checkpoints": AT_LEAST_1, "spike_factor": Range(1, low_open=True), "max_train_tokens": AT_LEAST_1,
    "sample_factor": AT_LEAST_1, "eval_every": AT_LEAST_0, "eval_tokens": AT_LEAST_1, "ema_momentum": Range(0, 1),
    "lora_rank": AT_LEAST_0, "lora_alpha": POSITIVE,
}
_KINDS = {"int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          "bool": ("true or false", lambda v: isinstance(v, bool)),
          "str": ("a string", lambda v: isinstance(v, str))}


def check_value(label: str, value: float, valid: Range) -> None:
    """Refuse a number outside `valid` in one line naming it (`label`: its flag) and the range."""
    if value not in valid:
        raise ValueError(f"{label} must be {valid}, got {value}")


def check_settings(values: dict, where: str | None = None) -> None:
    """Refuse a training setting of the wrong type or out of its range, in one line naming it and what is valid.
    `where` names the --config file the values came from (its keys are named then; else their flags)."""
    from ..method.aux import AUX_KINDS  # torch: loaded only when a run is about to start

    types = {f.name: str(f.type) for f in fields(TrainConfig)} | {name: "float" for name in SIGMA_OVERRIDES}
    choices = {"dtype": DTYPES, "aux_kind": AUX_KINDS}
    for name, value in values.items():
        label = f"--config {where}: {name!r}" if where else flag(name)
        if name not in types:
            raise ValueError(f"{f'--config {where}: ' if where else ''}unknown setting {name!r}; every setting is a "
                             "flag of `lnfree remove --help`")
        kind = types[name]
        if value is None and kind.endswith("| None"):
            continue
        if kind.startswith("tuple"):  # betas
            words, ok = "two numbers", isinstance(value, (list, tuple)) and len(value) == 2 and all(
                _KINDS["float"][1](v) for v in value)
        else:
            words, test = _KINDS[kind.split(" |")[0]]
            ok = test(value)
        if not ok:
            raise ValueError(f"{label} must be {words}, got {value!r}")
        if name == "lora_trainable":
            from .lora import trainable_kinds

            trainable_kinds(value)
        if name in choices and value not in choices[name]:
            raise ValueError(f"{label} must be one of {', '.join(choices[name])}, got {value!r}")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if name in SETTING_RANGES:
                check_value(label, v, SETTING_RANGES[name])


@dataclass
class TrainConfig:
    """One fine-tuning (or pretraining) run. Every field is a command-line flag (`--batch-tokens` for
    batch_tokens); a preset fills them, flags and `--config FILE` override single ones."""

    steps: int = _opt(300, "optimizer steps; a preset's schedule, warmup and lr horizon are rescaled to this")
    batch_tokens: int = _opt(2**19, "tokens per optimizer step (gradient accumulation over micro-batches)")
    micro_batch: int = _opt(8, "sequences per forward/backward")
    ctx: int = _opt(1024, "tokens per sequence (no BOS prepended, as in both papers)")
    lr: float = _opt(6e-4, "peak learning rate")
    min_lr: float = _opt(3e-4, "the cosine decay ends here (Baroni et al. 2025: a high floor stops the loss "
                               "creeping up after removal)")
    warmup_steps: int = _opt(20, "linear warmup from lr 0: step s < warmup runs at lr · s / warmup")
    decay_steps: int | None = _opt(None, "step at which the cosine reaches --min-lr (nanoGPT's lr_decay_iters; "
                                         "default --steps): Heimersheim 2024 decays over 2000 steps, stops at 1200")
    weight_decay: float = _opt(0.01, "AdamW weight decay on matrices and embeddings (never biases)")
    decay_norm_weights: bool = _opt(False, "weight decay on LayerNorm gains too (the HF Trainer's grouping)")
    betas: tuple[float, float] = _opt((0.9, 0.95), "AdamW betas")
    grad_clip: float = _opt(1.0, "gradient norm clip")
    dropout: float = _opt(0.0, "dropout in training forwards, where the family puts it (GPT-2: embeddings, "
                               "attention, residual writes)")
    aux_weight: float = _opt(0.0, "Baroni's auxiliary loss: weight × mean over tokens of (σ_t − σ̄)² at the "
                                  "ln_final input")
    aux_kind: str = _opt("baroni", "form of the auxiliary loss: baroni — (σ_t − σ̄)² at the ln_final input (Baroni "
                                   "et al. 2025); relative — the same over σ̄² (scale-free); sites — log²(σ_t/σ̄) at "
                                   "every norm's input, averaged (ours; method/aux.py); sites-worst — the same plus "
                                   "each sequence's most outlying token (ours)")
    distill_weight: float = _opt(0.0, "distillation from the model as loaded: weight × KL(original ‖ model) per "
                                      "token, the original with every norm live (ours; the control drops it, as it "
                                      "drops the aux loss)")
    calibration_batches: int = _opt(4, "micro-batches that measure σ̂ before the first step")
    seed: int = _opt(0, "data order, dropout masks and calibration draws")
    control: bool = _opt(False, "vanilla control: the identical run with every LayerNorm kept")
    compile: bool = _opt(False, "torch.compile the model")
    activation_checkpointing: bool = _opt(False, "recompute block activations in backward (less memory)")
    lora_rank: int = _opt(0, "LoRA (peft): train a rank-R update of each targeted linear map, the base weights "
                             "frozen, merged into them at the end (0: full fine-tuning)")
    lora_alpha: float | None = _opt(None, "LoRA: updates are scaled by alpha / rank (default: rank, scale 1)")
    lora_targets: str = _opt("all", "LoRA: the blocks' linear maps to adapt: all, or a comma list of their names "
                                    "(q_proj,v_proj; c_attn,c_fc)")
    lora_trainable: str = _opt("norms", "LoRA: parameters that stay fully trainable beside the adapters: a comma "
                                        "list of norms, biases, embeddings, or none")
    dtype: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    device: str = _opt("auto", "auto (cuda when available; under torchrun each rank's own card), cpu, cuda or cuda:N")
    fsdp: bool = _opt(False, "under torchrun: shard parameters, gradients and optimizer state with FSDP2 (per "
                             "block) instead of replicating the model with DDP")
    dist_timeout: float = _opt(600.0, "under torchrun: seconds a rank waits for the others before the run stops "
                                      "with a message naming the rank that did not answer")
    checkpoint_every: int = _opt(50, "write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk (oldest deleted first)")
    spike_factor: float = _opt(10.0, "stop when a step's loss exceeds this multiple of the running median (or "
                                     "is not finite)")
    max_train_tokens: int | None = _opt(None, "tokens a removal run tokenizes and reads from: a seeded random sample "
                                              "of the data's documents (default: --sample-factor × what the run "
                                              "reads)")
    sample_factor: float = _opt(4.0, "the sample a removal run reads from holds this many times the tokens it reads "
                                     "(steps × batch tokens), so its sequences come from that many times more "
                                     "documents")
    full_cache: bool = _opt(False, "tokenize the whole training split first (nanoGPT's prepare.py) instead of a "
                                   "sample that covers the run")
    eval_every: int = _opt(0, "validation CE every N steps and at the end, on the data's val split (0: never)")
    eval_tokens: int = _opt(2**17, "tokens of the val split each validation scores (the same sequences each time)")

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
