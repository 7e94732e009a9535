"""``retrieval duplicates``: group the exact and near copies of a folder or a bundle, show them
(text, ``--json``, ``--csv``, ``--html``), and move the copies not kept out of the folder with
a journal that ``--undo`` replays backwards. Nothing is ever deleted."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrieval.cli.common import EXIT_CODES, EXIT_PROBLEMS

__all__ = ["add_duplicates"]


def _text(report: Any, out: Any) -> None:
    from retrieval.search.duplicates import readable_size

    groups = report.groups
    exact = sum(g.kind == "exact" for g in groups)
    spare = sum(1 for g in groups for m in g.members if not m.keep)
    freed = sum(g.freed_bytes for g in groups)
    for number, group in enumerate(groups, start=1):
        print(f"group {number} ({group.kind}, frees {readable_size(group.freed_bytes)})", file=out)
        for m, shown in zip(group.members, group.to_list(), strict=True):
            tag = "keep" if m.keep else shown["kind"]
            print(f"  {tag:<5} {m.score:6.3f}  {m.path}", file=out)
    print(
        f"{len(groups)} group(s) ({exact} exact, {len(groups) - exact} near) among "
        f"{report.files} images; {spare} copies could go, freeing {readable_size(freed)}",
        file=out,
    )


def _write_csv(report: Any, path: Path) -> None:
    fields = ["group", "path", "kind", "score", "keep", "width", "height", "bytes"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for number, group in enumerate(report.groups, start=1):
            for member in group.to_list():
                writer.writerow({"group": number, **member})


def _move(report: Any, args: argparse.Namespace) -> int:
    from retrieval.infra.moves import move_files

    if (Path(args.target) / "manifest.json").is_file():
        raise ValueError("--move-to moves files out of a folder: give the folder as TARGET")
    spare = [m.path for g in report.groups for m in g.members if not m.keep]
    dest = Path(args.move_to)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    journal = Path(args.journal) if args.journal else dest / f"undo-{stamp}.jsonl"
    moved = move_files(spare, args.target, dest, journal)
    print(
        f"moved {len(moved.moved)} file(s) to {dest}; undo with: "
        f"retrieval duplicates --undo {journal}",
        file=sys.stderr,
    )
    return 0


def _undo(args: argparse.Namespace) -> int:
    from retrieval.infra.moves import undo_moves

    report = undo_moves(args.undo)
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"restored {len(report.moved)} file(s)", file=sys.stderr)
    return EXIT_PROBLEMS if report.problems else 0


def _run(args: argparse.Namespace) -> int:
    if args.undo:
        if args.target is not None:
            raise ValueError("--undo takes only the journal: drop TARGET")
        return _undo(args)
    if args.target is None:
        raise ValueError("give a folder or a bundle to look for duplicates in")
    if not Path(args.target).is_dir():  # said before the model loads
        raise ValueError(f"{args.target} is neither a folder nor a bundle")
    from retrieval.infra.progress import progress
    from retrieval.search.duplicate_finder import DEFAULT_CACHE, find_duplicates

    with progress(None, "reading images", unit="image", quiet=args.quiet) as bar:
        report = find_duplicates(
            args.target,
            model=args.model,
            threshold=args.threshold,
            precision=args.precision,
            keep=args.keep,
            protect=args.protect,
            k=args.k,
            cache=None if args.no_cache else (args.cache or DEFAULT_CACHE),
            runtime=args.runtime,
            threads=args.threads,
            progress=bar.update,
        )
    print(f"threshold {report.threshold:.4f} ({report.threshold_source})", file=sys.stderr)
    for path, reason in report.unreadable[:10]:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        _text(report, sys.stdout)
    if args.csv:
        _write_csv(report, Path(args.csv))
    if args.html:
        from retrieval.search.duplicate_finder import write_page

        page = write_page(report.groups, args.html, report.threshold)
        print(f"page: {page}", file=sys.stderr)
    return _move(report, args) if args.move_to else 0


def add_duplicates(sub: Any) -> None:
    """``retrieval duplicates TARGET [options]`` and ``retrieval duplicates --undo JOURNAL``."""
    help = "group exact and near copies in a folder or a bundle; move the spare ones aside"
    p = sub.add_parser("duplicates", help=help, description=help, epilog=EXIT_CODES)
    p.add_argument("target", nargs="?", help="a folder of images or a bundle")
    p.add_argument(
        "--model",
        help="embed the folder with this bundle's model (default: the pretrained default model)",
    )
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--threshold", type=float, help="near copies from this cosine similarity")
    pick.add_argument(
        "--precision", type=float, help="the threshold that gave this pair precision in calibration"
    )
    p.add_argument(
        "--keep",
        choices=("largest", "oldest", "newest", "path"),
        default="largest",
        help="which copy to keep: largest = most pixels, then largest file, then "
        "oldest, then path (default)",
    )
    p.add_argument(
        "--protect",
        action="append",
        default=[],
        metavar="DIR",
        help="files under DIR are always kept (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--csv", metavar="FILE", help="also write the groups to a CSV file")
    p.add_argument("--html", metavar="DIR", help="also write a page of the groups with thumbnails")
    p.add_argument(
        "--move-to",
        metavar="DIR",
        help="move the copies not kept to DIR (same relative paths) with a journal",
    )
    p.add_argument("--journal", metavar="FILE", help="where --move-to writes its journal")
    p.add_argument("--undo", metavar="JOURNAL", help="move back what a journal records")
    p.add_argument("-k", type=int, default=32, help="neighbours looked at per image")
    p.add_argument(
        "--cache",
        default=None,
        help="embedding cache folder (default: ~/.cache/retrieval/duplicates)",
    )
    p.add_argument("--no-cache", action="store_true", help="embed every image again")
    p.add_argument(
        "--runtime", default="auto", choices=("auto", "onnx", "openvino", "torchscript", "eager")
    )
    p.add_argument("--threads", type=int, default=None, help="model threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run)
