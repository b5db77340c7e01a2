"""The ``latentsel`` command line: the only package that knows about all the others.

One module per command group: :mod:`~latentsel.cli.traces` (``world``, ``generate``,
``validate``, ``simulate``), :mod:`~latentsel.cli.fit` (``fit``),
:mod:`~latentsel.cli.experiments` (``demo``, ``identify``, ``analyze``, ``report``) and
:mod:`~latentsel.cli.policy` (``train``, ``sample``, ``evaluate``, ``protocol``). Start-up
loads neither JAX nor torch: the commands that need them import them when they run, and
:func:`main` starts JAX once, in float64, for the commands that run inference.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
import traceback

from latentsel import __version__
from latentsel._jax import start_jax
from latentsel.cli import experiments, fit, policy, traces

__all__ = ["main", "build_parser"]

MAX_MESSAGE = 1000
"""Characters of an error message printed; the rest is counted, not printed (a message may echo
a huge user-provided value)."""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, unless the help says it already or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        none = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "%(default)" in text or none or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit status 2; defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            close = difflib.get_close_matches(bad.group(1), re.findall(r"'([^']*)'", bad.group(2)), n=1)
            message += f"; did you mean {close[0]!r}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentsel", description="The hierarchical latent selection model of reasoning traces.")
    parser.add_argument("--version", action="version", version=f"latentsel {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    experiments.add_demo(sub)
    for group in (traces, fit, experiments, policy):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "jax_devices", None) is not None:
            start_jax(args.jax_devices(args))
        return args.func(args)
    except KeyboardInterrupt:
        print("latentsel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"latentsel {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: Exception) -> str:
    """The first line of an error's message, at most :data:`MAX_MESSAGE` characters."""
    text = str(e)
    message = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
    if isinstance(e, KeyError) and message.startswith(("'", '"')):
        message = message[1:-1]
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}… ({len(message) - MAX_MESSAGE} more characters)"
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
