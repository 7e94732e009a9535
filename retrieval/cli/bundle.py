"""``retrieval index`` (grow a bundle from a folder), ``retrieval info`` (describe it) and
``retrieval verify`` (check its files, item store and index).

``retrieval push BUNDLE TARGET``: the bundle's items and vectors uploaded to a Milvus
collection (see :func:`retrieval.backends.milvus.push_bundle`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retrieval.bundle.format import BundleError
from retrieval.cli.common import EXIT_CODES, EXIT_PROBLEMS, bundle_command, load
from retrieval.data.images import images_in_folder
from retrieval.data.manifest import folder_labels


def _index(args: argparse.Namespace) -> int:
    from retrieval.infra.progress import progress

    root = Path(args.folder)
    paths = images_in_folder(root)
    labels = folder_labels(paths, root, args.labels)
    with (
        load(args) as retriever,
        progress(len(paths), "indexing", unit="image", quiet=args.quiet) as bar,
    ):
        report = retriever.add(paths, labels, batch_size=args.batch_size, progress=bar.update)
        total = len(retriever)
    print(
        f"added {len(report.added)}, already present {len(report.duplicates)}, "
        f"unreadable {len(report.unreadable)}; the bundle holds {total} items"
    )
    for path, reason in report.unreadable[:10]:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0


def _settings(value: Any) -> str:
    """``{"k": 3, "alpha": 3.0}`` -> ``k=3, alpha=3.0``; ``{}`` / None -> ``none``."""
    if not value:
        return "none"
    if isinstance(value, dict):
        return ", ".join(
            f"{key}({_settings(v)})" if isinstance(v, dict) else f"{key}={v}"
            for key, v in value.items()
        )
    return str(value)


def _info_lines(info: dict[str, Any]) -> list[str]:
    """``retrieval info`` as aligned ``name  value`` lines."""
    index = info.get("index") or {}
    lines = [
        ("bundle", info["bundle"]),
        ("created", info.get("created") or "unknown"),
        ("format version", info["format_version"]),
        ("backbone", info.get("backbone") or "unknown"),
        ("embedding", f"{info['embedding_dim']}-d, {info['metric']}"),
        ("index", index.get("factory", "?")),
        ("search params", index.get("search_params") or "none"),
        ("items", info["items"]),
        ("runtime", info["runtime"]),
        ("search steps", _settings(info.get("postprocess"))),
    ]
    out = [f"{name:<16}{value}" for name, value in lines]
    metrics = info.get("metrics") or {}
    if metrics:
        out.append(f"{'metrics':<16}{info.get('metrics_note') or 'measured at export'}")
        out += [f"  {name:<22}{number:.4f}" for name, number in metrics.items()]
    return out


def _info(args: argparse.Namespace) -> int:
    with load(args, read_only=True) as retriever:
        info = retriever.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("\n".join(_info_lines(info)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Open the bundle as a reader (beside a writer such as ``retrieval serve``) and report what
    :meth:`Retriever.verify` finds; a bundle that cannot be loaded (a missing or altered file,
    parts that do not fit together) is one problem found."""
    from retrieval.bundle.format import read_manifest

    read_manifest(Path(args.bundle))  # not a bundle: an error (exit 2)
    try:
        retriever = load(args, read_only=True)
    except BundleError as err:
        print(f"problem: {err}")
        print("1 problem(s) found; the bundle cannot be loaded until it is repaired or re-exported")
        return EXIT_PROBLEMS
    with retriever:
        problems = retriever.verify()
    for problem in problems:
        print(f"problem: {problem}")
    print("bundle OK" if not problems else f"{len(problems)} problem(s) found")
    return EXIT_PROBLEMS if problems else 0


def add_index(sub: Any) -> None:
    """``retrieval index BUNDLE DIR [--labels folder|none] [--batch-size N] [--quiet]``."""
    p = bundle_command(sub, "index", "add every image under a folder (recursively) to the bundle")
    p.add_argument("folder", help="folder of images to add (searched recursively)")
    p.add_argument(
        "--labels",
        choices=("folder", "none"),
        default="none",
        help="folder: label each image by its folder under FOLDER",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_index)


def add_info(sub: Any) -> None:
    """``retrieval info BUNDLE [--json]``."""
    p = bundle_command(sub, "info", "describe the bundle: model, index, items, metrics")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_info)


def add_verify(sub: Any) -> None:
    """``retrieval verify BUNDLE``: exit 1 on problems."""
    p = bundle_command(
        sub, "verify", "check checksums, the item store and the index; exit 1 on problems"
    )
    p.set_defaults(run=_verify)


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
