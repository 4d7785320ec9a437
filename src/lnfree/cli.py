"""`lnfree` command line: parse, build the config, call the library. Errors print as one line, exit 2.

Here: the parser, assembled from the subcommands of `lnfree.commands` (each declares its flags and the body it runs;
flags several commands share are declared once, in `commands/flags.py`), `main`, and how an error becomes one line.
"""

from __future__ import annotations

import argparse
import errno
import pickle
import sys

from .commands import analysis, export, training

# in the order `lnfree --help` lists them
COMMANDS = [training.add_schedule, training.add_remove, training.add_pretrain, analysis.add_eval, training.add_demo,
            export.add_export, export.add_verify, analysis.add_plot, analysis.add_compare]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return f"lnfree {v('lnfree')} (torch {v('torch')}, transformers {v('transformers')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lnfree", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help and --version stay instant
    from safetensors import SafetensorError

    from .data import DataSourceError
    from .distributed import PeerFailed, PeerLost
    from .run.train import TrainingDiverged

    try:
        return args.func(args) or 0
    except SafetensorError as e:  # a truncated or foreign .safetensors file, or a full disk while writing one
        first = str(e).splitlines()[0] if str(e) else "corrupt"
        if _disk_full(e):
            _error(f"no space left on the device while writing weights ({first}); free space, then rerun (a run: "
                   "--resume continues from its last complete checkpoint)")
        else:
            _error(f"a weights file is unreadable ({first}); it may be truncated — restore it, or resume from an "
                   "earlier checkpoint")
        return 2
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a pickle holding code
        _error(f"a .bin weights file holds more than tensors and is not loaded (weights_only: "
               f"{str(e).splitlines()[0][:120]}); convert it to safetensors, or load it from a source you trust")
        return 2
    except PeerLost as e:  # names the rank that stopped answering: every rank that saw it says so
        _error(str(e), every_rank=True)
        return 2
    except PeerFailed:  # rank 0 stopped and said why
        return 2
    except (ValueError, FileNotFoundError, OSError, DataSourceError, TrainingDiverged) as e:
        if _disk_full(e):
            _error(f"no space left on the device ({e}); free space, then rerun (a run: --resume continues from its "
                   "last complete checkpoint)")
        else:
            _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2
    except KeyboardInterrupt:
        print("lnfree: interrupted", file=sys.stderr)
        return 130


def _disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) or "os error 28" in str(e)


def _error(msg: str, every_rank: bool = False) -> None:
    """One line on stderr — under torchrun from rank 0 only (the ranks meet the same bad input), unless the error is
    this rank's own."""
    from .distributed import current

    world = current()
    if world.is_main or every_rank:
        print(f"lnfree: error: {msg}" if world.is_main else f"lnfree: error: rank {world.rank}: {msg}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
