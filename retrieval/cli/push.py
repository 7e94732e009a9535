"""``retrieval push BUNDLE TARGET``: the bundle's items and vectors uploaded to a Milvus
collection (see :func:`retrieval.backends.milvus.push_bundle`)."""

from __future__ import annotations

import argparse
from typing import Any

from retrieval.cli.common import EXIT_CODES


def _push(args: argparse.Namespace) -> int:
    from retrieval.backends import parse_backend
    from retrieval.backends.milvus import push_bundle
    from retrieval.infra.checks import positive_int

    positive_int(args.batch_size, "--batch-size")  # before the engine is touched
    spec = parse_backend(args.target)
    from retrieval.infra.progress import progress

    with progress(None, "pushing", unit="item", quiet=args.quiet) as bar:
        report = push_bundle(
            args.bundle, spec, args.batch_size, progress=bar.update, repair=args.repair
        )
    for line in report.repaired:
        print(line)
    print(
        f"pushed {report.pushed}, already there {report.present}, deleted {report.deleted}, "
        f"left out {report.left_out} removed through the engine; {spec.where} holds "
        f"{report.total} items ({report.index['index_type']} index)"
    )
    return 0


def add_push(sub: Any) -> None:
    """``retrieval push BUNDLE milvus://HOST:PORT/COLLECTION | milvus-lite:PATH[#COLLECTION]``."""
    p = sub.add_parser(
        "push",
        help="upload the bundle's items and vectors to a Milvus collection (resumable)",
        description="Upload the bundle's items and vectors, with their ids, labels and extra "
        "fields, to a Milvus collection (created with an HNSW or IVF index sized to the "
        "bundle). Items removed through the engine are not brought back. After a crash run "
        "it again with --repair: items already there are skipped, and an index the crash "
        "left unloadable is rebuilt from the stored vectors.",
        epilog=EXIT_CODES,
    )
    p.add_argument("bundle", help="bundle folder written by export.py")
    p.add_argument("target", help="milvus://HOST:PORT/COLLECTION or milvus-lite:PATH[#COLLECTION]")
    p.add_argument("--batch-size", type=int, default=1000, help="items per request")
    p.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the collection's vector index from its stored vectors if it cannot be "
        "loaded (a Milvus Lite index file torn by a killed process); rows are kept",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_push)
