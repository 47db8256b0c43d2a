"""The ``evc`` command: encode, decode, info, eval, bdrate, plot, bench, train, decay, rrl.

Each group of commands lives in its own module and registers its sub-parsers with a handler; :func:`main` parses,
tunes the process's memory allocation for the commands that run the codec's networks, and dispatches. Every failure
is reported as one line ``evc: error: ...`` on stderr with a non-zero exit status (2 for usage errors, 1 otherwise);
output files are written atomically, so a failed run leaves no partial file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ..engines.allocator import tune_allocator
from . import bench, codec_cmds, evaluate, training
from .common import CLIError, Parser

__all__ = ["build_parser", "main"]

#: commands that run the codec's networks: main() tunes the process's memory allocation for them (``bench`` tunes
#: in its own handler, before its first tensor, and records the outcome)
_TUNED_COMMANDS = ("encode", "decode", "eval")

_PARSER: argparse.ArgumentParser | None = None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``evc`` command; every sub-command sets ``handler``."""
    ap = Parser(prog="evc", description="EVC neural image codec (encode/decode/evaluate).")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    codec_cmds.add_parsers(sub)
    evaluate.add_parsers(sub)
    bench.add_parser(sub)
    training.add_parsers(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``evc`` console script; returns the exit status."""
    global _PARSER
    if _PARSER is None:
        _PARSER = build_parser()
    try:
        args = _PARSER.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="evc: %(levelname)s: %(message)s")
    if args.cmd in _TUNED_COMMANDS:  # before the first tensor exists (huge pages are chosen at the first allocation)
        tune_allocator(keep_freed=not args.low_memory)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("evc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback (unless --debug)
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        known = isinstance(e, (CLIError, ValueError, OSError))
        prefix = "error" if known else f"internal error ({type(e).__name__})"
        print(f"evc: {prefix}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
