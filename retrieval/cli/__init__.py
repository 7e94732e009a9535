"""``retrieval`` command: search, grow and inspect an exported bundle.

retrieval search BUNDLE IMAGE... [-k 10] [--json]
retrieval index BUNDLE DIR [--labels folder|none]
retrieval info BUNDLE
retrieval verify BUNDLE
retrieval score BUNDLE MANIFEST [--split test] [-k 10] [--json]
retrieval serve BUNDLE [--host 127.0.0.1] [--port 8000] [--token SECRET] [--backend SPEC]
retrieval push BUNDLE milvus://HOST:PORT/COLLECTION | milvus-lite:PATH[#COLLECTION]
retrieval duplicates FOLDER|BUNDLE [--json] [--keep largest] [--protect DIR] [--move-to DIR]

search, info and score open the bundle read-only, so they run beside the one process that
holds it for writing (serve, index). Unreadable images are skipped and listed on stderr by
search and index alike. Exit codes: 0 done, 1 problems found (verify), 2 an error (one
``error:`` line on stderr).

Commands by module: :mod:`~retrieval.cli.search` (search, score), :mod:`~retrieval.cli.bundle`
(index, info, verify), :mod:`~retrieval.cli.serve` and :mod:`~retrieval.cli.bundle`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from retrieval.bundle.format import BundleBusyError, BundleError, ReadOnlyError
from retrieval.cli.bundle import add_index, add_info, add_push, add_verify
from retrieval.cli.common import EXIT_CODES, EXIT_ERROR, EXIT_INTERRUPTED, version
from retrieval.cli.duplicates import add_duplicates
from retrieval.cli.search import add_score, add_search
from retrieval.cli.serve import add_serve
from retrieval.data.images import ImageLoadError
from retrieval.infra.checks import error_line

__all__ = ["EXPECTED_ERRORS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``retrieval`` argument parser, one subcommand a command."""
    parser = argparse.ArgumentParser(
        prog="retrieval", description="Search an exported bundle.", epilog=EXIT_CODES
    )
    parser.add_argument("--version", action="version", version=f"retrieval {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (add_search, add_index, add_info, add_verify, add_score, add_push, add_serve)
    for add in (*commands, add_duplicates):
        add(sub)
    return parser


#: what a command can meet in normal use, each reported as one ``error:`` line (a bug
#: anywhere else still shows its traceback)
EXPECTED_ERRORS = (
    BundleError,
    BundleBusyError,
    ReadOnlyError,
    ImageLoadError,
    ValueError,
    KeyError,
    OSError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (``sys.argv[1:]`` by default); its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except EXPECTED_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
