"""Command line: `mixchat inspect DIR`, `mixchat verify DIR`, and chat (later issues).

Expected failures are MixchatError: one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from mixchat import __version__
from mixchat.errors import MixchatError


def _inspect(ns: argparse.Namespace) -> int:
    from mixchat.inspection import format_report, inspect_release

    report = inspect_release(ns.folder)
    print(json.dumps(report, indent=2) if ns.json else format_report(report))
    # The report is printed either way; the exit status lets scripts tell a usable folder.
    return 0 if report["problem"] is None else 1


def _verify(ns: argparse.Namespace) -> int:
    from mixchat.inspection import verify_release

    verify_release(ns.folder, out=lambda line: print(line, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixchat", description="Chat with Mistral and Mixtral release folders, with mixchat's own model code."
    )
    parser.add_argument("--version", action="version", version=f"mixchat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="show what a release folder holds (shapes, params, memory) in seconds")
    p.add_argument("folder", help="release folder (params.json, consolidated.00.pth, tokenizer.model)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="check the files against the md5 sums in RELEASE")
    p.add_argument("folder", help="release folder with a RELEASE file")
    p.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 0
    try:
        return ns.func(ns)
    except MixchatError as exc:
        print(f"mixchat: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
