"""``retrieval`` command: search, grow and inspect an exported bundle.

retrieval search BUNDLE IMAGE... [-k 10] [--json]
retrieval index BUNDLE DIR [--labels folder|none]
retrieval info BUNDLE
retrieval verify BUNDLE
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.bundle.format import BundleError
from retrieval.data.images import ImageLoadError, images_in_folder

EXIT_PROBLEMS, EXIT_ERROR = 1, 2


def _load(args: argparse.Namespace) -> Any:
    from retrieval.search import Retriever  # heavy imports only once a command runs

    return Retriever.load(args.bundle, runtime=args.runtime, threads=args.threads)


def _search(args: argparse.Namespace) -> int:
    with _load(args) as retriever:
        results = retriever.search(args.images, k=args.k, label=args.label)
    if args.json:
        payload = [
            {"query": str(image), "results": [hit.__dict__ for hit in hits]}
            for image, hits in zip(args.images, results, strict=True)
        ]
        print(json.dumps(payload, indent=2))
        return 0
    for image, hits in zip(args.images, results, strict=True):
        print(f"{image}")
        print(f"  {'rank':>4}  {'score':>6}  {'id':>7}  {'label':<16}  path")
        for rank, hit in enumerate(hits, 1):
            label = "" if hit.label is None else hit.label
            print(f"  {rank:>4}  {hit.score:>6.3f}  {hit.id:>7}  {label[:16]:<16}  {hit.uri}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    root = Path(args.folder)
    paths = images_in_folder(root)
    labels: list[str | None] | None = None
    if args.labels == "folder":
        folders = [p.parent.relative_to(root).as_posix() for p in paths]
        labels = [None if name == "." else name for name in folders]
    with _load(args) as retriever, tqdm(total=len(paths), unit="img", disable=args.quiet) as bar:
        report = retriever.add(paths, labels, batch_size=args.batch_size, progress=bar.update)
        total = len(retriever)
    print(
        f"added {len(report.added)}, already present {len(report.duplicates)}, "
        f"unreadable {len(report.unreadable)}; the bundle holds {total} items"
    )
    for path, reason in report.unreadable[:10]:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    with _load(args) as retriever:
        info = retriever.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "metrics":
            for name, number in value.items():
                print(f"{name:<22}{number:.4f}")
        else:
            print(f"{key:<22}{value}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _load(args) as retriever:
        problems = retriever.verify()
    for problem in problems:
        print(f"problem: {problem}")
    print("bundle OK" if not problems else f"{len(problems)} problem(s) found")
    return EXIT_PROBLEMS if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval", description="Search an exported bundle.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("bundle", help="bundle folder written by export.py")
        p.add_argument(
            "--runtime", default="auto", choices=("auto", "onnx", "torchscript", "eager")
        )
        p.add_argument("--threads", type=int, default=None, help="model threads")
        return p

    p = command("search", "find the items most similar to each image")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("-k", type=int, default=10, help="results per image (default 10)")
    p.add_argument("--label", default=None, help="only items with this label")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_search)

    p = command("index", "add every image under a folder (recursively) to the bundle")
    p.add_argument("folder")
    p.add_argument(
        "--labels",
        choices=("folder", "none"),
        default="none",
        help="folder: label each image by its folder under FOLDER",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_index)

    p = command("info", "describe the bundle: model, index, items, metrics")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_info)

    p = command("verify", "check checksums, the item store and the index; exit 1 on problems")
    p.set_defaults(run=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (BundleError, ImageLoadError, ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
