"""`tensorsam <command> ...`: the command-line entry point.

The commands are the registered tasks (:data:`tensorsam.tasks.registry.TASKS`: ``tensorsam <task>
[--config FILE] [--set key=value] [--out DIR] [--resume]``) and the tools in :data:`TOOLS`.  Each
command lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``--help`` stays fast (no torch) and a
missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# commands that are not tasks: name -> (module, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "report": ("tensorsam.commands.report", "render tables and figures from results files"),
    "compress-demo": ("tensorsam.commands.compress_demo", "decompose a dense layer in every format"),
    "tune": ("tensorsam.commands.tune", "search a task's rho, alpha and lr with optuna on the validation split"),
}


def commands() -> dict[str, tuple[str, str]]:
    """Every command: the registered tasks, then the tools; name -> (module, one-line help)."""
    from tensorsam.tasks.registry import TASKS

    return {**{name: (task.command, task.help) for name, task in TASKS.items()}, **TOOLS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorsam", description="Sharpness-aware training of tensorized models."
    )
    parser.add_argument("--version", action="version", version=f"tensorsam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_) in commands().items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        # arguments are attached lazily in main() to keep --help import-light
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    table = commands()
    if argv and argv[0] in table:
        module_name, help_ = table[argv[0]]
        module = importlib.import_module(module_name)
        p = argparse.ArgumentParser(prog=f"tensorsam {argv[0]}", description=help_)
        module.add_arguments(p)
        args = p.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except (ValueError, FileNotFoundError) as err:
            print(f"tensorsam {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"tensorsam {argv[0]}: interrupted; the last checkpoint (if any) is kept, "
                  "rerun with --resume", file=sys.stderr)
            return 130
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
