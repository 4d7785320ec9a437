"""The `lnfree` subcommands, each an `add_*` function that declares its flags and the body it runs: `training`
(schedule, remove, pretrain, demo), `analysis` (eval, plot, compare), `export` (export, verify). Flags more than one
command takes are declared once, in `flags`. `lnfree.cli` assembles the parser and turns errors into one line.

Nothing here imports torch at import time: `lnfree --help` and `--version` stay instant.
"""
