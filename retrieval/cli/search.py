"""``retrieval search`` (query images against a bundle) and ``retrieval score`` (a
manifest's query images searched and their hits scored)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.cli.common import RERANK_HELP, bundle_command, load
from retrieval.data.images import ImageLoadError


def _embed_queries(
    retriever: Any, images: Sequence[str], batch_size: int = 32
) -> tuple[list[str], Any, list[tuple[str, str]]]:
    """The readable ``images``, their embeddings (n, dim) and ``(image, reason)`` of the others."""
    import numpy as np

    readable, unreadable, vectors = [], [], [np.empty((0, retriever.dim), np.float32)]
    batch: list[Any] = []
    for image in images:
        try:
            batch.append(retriever.prepare(image))
            readable.append(image)
        except (ImageLoadError, OSError) as err:
            unreadable.append((image, str(err)))
        if len(batch) == batch_size:
            vectors.append(retriever.embed_pixels(batch))
            batch = []
    if batch:
        vectors.append(retriever.embed_pixels(batch))
    return readable, np.concatenate(vectors), unreadable


def _search(args: argparse.Namespace) -> int:
    from retrieval.bundle.format import read_manifest
    from retrieval.infra.checks import positive_int

    positive_int(args.k, "k")  # said before the model loads, as a bundle or images not there
    read_manifest(args.bundle)
    absent = [image for image in args.images if not Path(image).exists()]
    if len(absent) == len(args.images):  # said before the model loads
        if len(absent) == 1:
            raise ValueError(f"{absent[0]}: no such file")
        raise ValueError(f"none of the {len(absent)} query images exist (first: {absent[0]})")
    with load(args, read_only=True) as retriever:
        images, vectors, unreadable = _embed_queries(retriever, args.images)
        results = retriever.search(vectors, k=args.k, label=args.label, rerank=args.rerank)
    if unreadable and not images:
        first = unreadable[0][1]
        if len(unreadable) == 1:
            raise ValueError(first)
        raise ValueError(f"none of the {len(unreadable)} query images could be read ({first})")
    for image, reason in unreadable:
        print(f"skipped {image}: {reason}", file=sys.stderr)
    code = 0
    if unreadable:
        print(
            f"searched {len(images)} of {len(args.images)} images, {len(unreadable)} unreadable",
            file=sys.stderr,
        )
    if args.json:
        payload = [
            {"query": str(image), "results": [hit.__dict__ for hit in hits]}
            for image, hits in zip(images, results, strict=True)
        ]
        payload += [{"query": str(image), "error": reason} for image, reason in unreadable]
        print(json.dumps(payload, indent=2))
        return code
    for image, hits in zip(images, results, strict=True):
        print(f"{image}")
        print(f"  {'rank':>4}  {'score':>6}  {'id':>7}  {'label':<16}  path")
        for rank, hit in enumerate(hits, 1):
            label = "" if hit.label is None else hit.label
            print(f"  {rank:>4}  {hit.score:>6.3f}  {hit.id:>7}  {label[:16]:<16}  {hit.uri}")
    return code


def _score(args: argparse.Namespace) -> int:
    from retrieval.data.manifest import ManifestError, read_manifest, select_split

    try:
        rows = select_split(read_manifest(args.manifest, args.root, check_files=False), args.split)
    except ManifestError as err:
        raise ValueError(str(err)) from None
    queries = [(r.path, r.label, r.extra.get("edit", "")) for r in rows if r.is_query]
    if not queries:
        raise ValueError(
            f"{args.manifest}: split '{args.split}' has no query rows (column is_query = 1)"
        )
    missing = [str(path) for path, _, _ in queries if not path.is_file()]
    if missing:
        raise ValueError(
            f"{args.manifest}: {len(missing)} of {len(queries)} query images do not exist "
            f"(first: {missing[0]}); pass --root, the folder the manifest's paths start from"
        )
    from retrieval.search.score import score_bundle  # torch: once the arguments are good

    with load(args, read_only=True) as retriever:
        result = score_bundle(
            retriever, queries, k=args.k, batch_size=args.batch_size, rerank=args.rerank
        )
        items = len(retriever)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.bundle}: {items} items")
    print(
        f"{args.manifest} (split {args.split}): {result['queries']} queries, "
        f"{result['scored']} scored, {result['excluded']} without a relevant item"
    )
    k = result["k"]
    for name in dict.fromkeys(("recall@1", f"recall@{k}", f"micro_ap@{k}")):
        print(f"  {name:<14}{result[name]:.4f}")
    print(f"  {'ms per query':<14}{1000 * result['seconds_per_query']:.1f}")
    if len(result["recall@1_by_edit"]) > 1 or "" not in result["recall@1_by_edit"]:
        print("recall@1 by edit:")
        for edit, value in result["recall@1_by_edit"].items():
            print(f"  {edit or '(none)':<14}{value:.4f}  ({result['edit_counts'][edit]} queries)")
    return 0


def add_search(sub: Any) -> None:
    """``retrieval search BUNDLE IMAGE... [-k 10] [--label L] [--[no-]rerank] [--json]``."""
    p = bundle_command(sub, "search", "find the items most similar to each image")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("-k", type=int, default=10, help="results per image (default 10)")
    p.add_argument("--label", default=None, help="only items with this label")
    p.add_argument(
        "--rerank", action=argparse.BooleanOptionalAction, default=None, help=RERANK_HELP
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_search)


def add_score(sub: Any) -> None:
    """``retrieval score BUNDLE MANIFEST [--split test] [-k 10] [--root DIR] [--json]``."""
    p = bundle_command(
        sub, "score", "search a manifest's query images in the bundle and score the hits"
    )
    p.add_argument("manifest", help="manifest CSV whose split has is_query rows")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--root", default=None, help="folder of the manifest's relative paths")
    p.add_argument(
        "--rerank", action=argparse.BooleanOptionalAction, default=None, help=RERANK_HELP
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_score)
