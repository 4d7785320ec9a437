"""`lnfree` command line: parse, build the config, call the library. Errors print as one line, exit 2."""

from __future__ import annotations

import argparse
import sys


def _add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="print a removal preset's timeline (step, site, event)")
    p.add_argument("--preset", default="baroni2025")
    p.add_argument("--layers", type=int, default=12, help="number of transformer blocks")
    p.add_argument("--steps", type=int, default=None, help="rescale the preset to this many steps")
    p.set_defaults(func=_run_schedule)


def _run_schedule(args: argparse.Namespace) -> int:
    from .recipes import get_recipe, recipe_schedule

    if args.layers < 1:
        raise ValueError(f"--layers must be at least 1, got {args.layers}")
    recipe = get_recipe(args.preset, args.layers)
    schedule = recipe_schedule(recipe, args.layers, args.steps)
    print(f"# preset {recipe.name} ({recipe.source}) on {args.layers} layers, {schedule.total_steps} steps")
    print(schedule.format_timeline())
    return 0


COMMANDS = [_add_schedule]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lnfree", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lnfree: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lnfree: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
