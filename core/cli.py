"""The `sol` command. No arguments opens the GUI.

Each area adds its subcommands from its own module in core/commands/ (each
has a `register(subparsers)`; they are found automatically), and plugins add
theirs through the `sol_cli_commands` hook. Failures print one line, `error: ...`, naming what
is wrong, and exit non-zero; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import SolError


def command_modules() -> list[str]:
    import pkgutil

    from . import commands
    return [f"{commands.__name__}.{m.name}" for m in pkgutil.iter_modules(commands.__path__)
            if m.name != "common" and not m.name.startswith("_")]


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like every other failure; argparse would print the usage too.
        sys.stderr.write(f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser(command: str | None = None) -> Parser:
    """The whole parser, or, when `command` is one of Sol's own, only that subcommand's. The whole one
    never imports torch (`sol --help` answers in a fraction of a second; tests/test_layers.py checks)."""
    parser = Parser(prog="sol", description="Sol: a desktop lab for small language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = command_modules()
    chosen = [m for m in modules if m.rsplit(".", 1)[-1] == command]
    for name in chosen or modules:
        module = importlib.import_module(name)
        # A command whose full flags are heavy to build (train: each stage's module, and torch) offers a
        # brief registration, its help line only, for the parser that just lists commands.
        register = module.register if chosen else getattr(module, "register_brief", module.register)
        register(sub)
    if not chosen:
        _plugin_commands(sub)
    return parser


def _plugin_commands(sub) -> None:
    try:
        from .plugins import manager as plugins
    except ImportError:
        return
    add = getattr(plugins, "add_cli_commands", None)
    if add is not None:
        add(sub)


def _global_safe_mode(argv: list[str]) -> list[str]:
    """`sol --safe-mode COMMAND ...` (before the subcommand) means safe mode for everything this process
    does, as SOL_SAFE_MODE=1 would; after the subcommand it is that subcommand's own flag."""
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if "--safe-mode" not in argv[:first]:
        return argv
    os.environ["SOL_SAFE_MODE"] = "1"   # every PluginManager of this process reads it
    return [a for a in argv[:first] if a != "--safe-mode"] + argv[first:]


def check_arguments(argv: list[str]) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates; no tokenizer or file name can use them."""
    for i, a in enumerate(argv):
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            shown = a.encode("utf-8", "backslashreplace").decode()[:60]
            raise SolError(f"argument {i + 1} ({shown}): not valid UTF-8; retype it or set a UTF-8 locale") from None


# Commands that run another program: what follows their first standalone `--` is that program's command
# line, untouched (argparse would stop reading options there but could not tell it from Sol's arguments
# once options come between the name and the `--`; nor may --debug be taken out of it).
TRAILING_COMMAND = {("mcp", "add")}


def _split_trailing(argv: list[str]) -> tuple[list[str], list[str] | None]:
    if tuple(argv[:2]) in TRAILING_COMMAND and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, trailing = _split_trailing(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    argv = _global_safe_mode(argv)
    if not argv:
        argv = ["gui"]
    try:
        check_arguments(argv)
        first = next((a for a in argv if not a.startswith("-")), None)
        args = build_parser(first).parse_args(argv)
        if trailing is not None:
            args.command = trailing
        if not getattr(args, "func", None):
            build_parser().print_help()
            return 2
        return int(args.func(args) or 0)
    except SolError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug in Sol: still one line, with how to see more
        if debug:
            raise
        first = (str(e).splitlines() or [""])[0]
        sys.stderr.write(f"error: unexpected {type(e).__name__}: {first} (run with --debug for the traceback)\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
