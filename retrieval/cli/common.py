"""What every ``retrieval`` command shares: exit codes, the version, the options of a command
that opens a bundle, and opening it."""

from __future__ import annotations

import argparse
from typing import Any

EXIT_PROBLEMS, EXIT_ERROR, EXIT_INTERRUPTED = 1, 2, 130
EXIT_CODES = (
    "exit codes: 0 done (unreadable images are skipped and listed); 1 problems found "
    "(verify); 2 an error, printed as one 'error: ...' line"
)
RERANK_HELP = "k-reciprocal re-ranking of the first results (default: as the bundle was exported)"


def version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrieval")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"


def bundle_command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand of ``sub`` that opens a bundle: ``BUNDLE [--runtime R] [--threads N]``."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, epilog=EXIT_CODES
    )
    p.add_argument("bundle", help="bundle folder written by export.py")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "onnx", "openvino", "torchscript", "eager"),
    )
    p.add_argument("--threads", type=int, default=None, help="model threads")
    return p


def load(args: argparse.Namespace, **options: Any) -> Any:
    """The Retriever of ``args.bundle`` with the command's runtime and threads. A path that
    is no bundle is refused from its manifest before torch and the runtimes are imported (an
    answer in a fraction of a second)."""
    from retrieval.bundle.format import read_manifest

    read_manifest(args.bundle)
    from retrieval.search.retriever import Retriever  # heavy imports only once a command runs

    return Retriever.load(args.bundle, runtime=args.runtime, threads=args.threads, **options)
