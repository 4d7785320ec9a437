"""Flags more than one command takes, declared once: the shared ones by name (`add_shared`), and every training
setting of `TrainConfig` as a flag (`add_train_options`, for `remove` and `pretrain`) with --config, which supplies
them from a file; the command line's values win over the file's (`training_overrides`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Flags that mean the same in every command that takes them. A command whose flag of the same name means something
# else (pretrain's required --tokenizer folder, the training settings' --device) declares its own.
SHARED_FLAGS = {
    "--cache-dir": {"type": Path, "help": "token cache root (default ~/.cache/lnfree/tokens)"},
    "--quiet": {"action": "store_true", "help": "no progress display"},
    "--device": {"help": "cuda / cpu (default: cuda when available)"},
    "--ctx": {"type": int, "help": "sequence length (default min(1024, the models' context))"},
    "--tokenizer": {"help": "tokenizer folder or hub id (default: the models' own)"},
}


def add_shared(p: argparse.ArgumentParser, *flags: str) -> None:
    """Add shared flags by name, in the order given (the order --help lists them)."""
    for name in flags:
        p.add_argument(name, **SHARED_FLAGS[name])


# TrainConfig fields set elsewhere (--control is its own flag)
_NOT_FLAGS = {"control"}


def _setting_names() -> list[str]:
    """TrainConfig fields that are command-line flags (and --config keys)."""
    from dataclasses import fields

    from ..run.config import TrainConfig

    return [f.name for f in fields(TrainConfig) if f.name not in _NOT_FLAGS]


def _flag_kwargs(f) -> dict:
    kind = str(f.type)
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if kind.startswith("tuple"):
        return {"type": float, "nargs": 2, "metavar": ("B1", "B2")}
    if f.name == "dtype":
        from ..run.config import DTYPES

        return {"choices": DTYPES}
    return {"type": {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}[kind]}


def add_train_options(p: argparse.ArgumentParser, shown, where: str) -> None:
    """A run's flags — data, run folder, --config, resume — and every TrainConfig field as a flag, its help and the
    default it takes here (`where` says whose). Each field's flag defaults to None: given or not is what tells the
    command line's value from --config's and the preset's."""
    from dataclasses import fields

    from ..run.config import FLAG_NAMES, TrainConfig

    p.add_argument("--data", help="stdlib | a local file/folder | a hub dataset (openwebtext, pile …)")
    p.add_argument("--out", required=True, type=Path, help="run folder (one run per folder)")
    p.add_argument("--config", type=Path, help="JSON of settings: a run.json (replays that run: model, data, preset "
                   "and every training setting) or {field: value}; flags given here win")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="clear the run in --out and start it again")
    p.add_argument("--eval-data", help="held-out source that --eval-every scores, all of it (default: the val "
                   "split of --data)")
    p.add_argument("--report-to", default="none", help="comma list: tensorboard, wandb (offline without "
                   "WANDB_API_KEY), none; metrics.jsonl is always written")
    add_shared(p, "--cache-dir", "--quiet")
    group = p.add_argument_group(f"training settings (default: {where})")
    for f in fields(TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        default = getattr(shown, f.name)
        aliases = [FLAG_NAMES[f.name]] if f.name in FLAG_NAMES else []
        group.add_argument("--" + f.name.replace("_", "-"), *aliases, dest=f.name, default=None,
                           help=f"{f.metadata['help']} [{default}]".replace("%", "%%"), **_flag_kwargs(f))


def training_overrides(args: argparse.Namespace) -> dict:
    """Training settings given on the command line, over those of --config."""
    from ..run.config import SIGMA_OVERRIDES

    names = _setting_names() + list(SIGMA_OVERRIDES)
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    return {**getattr(args, "config_overrides", {}), **given}


def read_config(args: argparse.Namespace, command: str) -> None:
    """Fold --config into args: training settings into args.config_overrides, and from a run.json of the same
    command its model / data / preset where the command line does not name them."""
    from ..run.config import check_settings

    args.config_overrides = {}
    if args.config is None:
        return
    try:
        loaded = json.loads(args.config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {args.config}: not a readable JSON file ({e})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {args.config}: expected a JSON object of settings")
    names = set(_setting_names())
    if "train" in loaded:  # a run.json: replay that run
        from ..run.record import RunRecord

        run = RunRecord.from_dict(loaded, f"--config {args.config}")
        settings = {k: v for k, v in run.train.to_dict().items() if k in names}
        if run.sigma is not None:
            settings["ema_momentum"] = run.sigma.momentum
        for key, value in (("model", run.model), ("data", run.data), ("preset", run.preset)):
            if value is not None and getattr(args, key, "absent") is None:
                setattr(args, key, value)
        if command == "remove" and run.mode == "control":
            args.control = True
    else:
        settings = dict(loaded)
    check_settings(settings, where=str(args.config))
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    args.config_overrides = settings


def require_data(args: argparse.Namespace) -> None:
    if not args.data:
        raise ValueError("--data is required (or a --config run.json that names it)")


def report_to(args: argparse.Namespace) -> tuple[str, ...]:
    """--report-to as reporter names, checked."""
    from ..run.tracking import check_reporters

    names = tuple(x.strip() for x in args.report_to.split(",") if x.strip())
    check_reporters(names)
    return names
