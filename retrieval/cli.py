"""``retrieval`` command: search, grow and inspect an exported bundle.

retrieval search BUNDLE IMAGE... [-k 10] [--json]
retrieval index BUNDLE DIR [--labels folder|none]
retrieval info BUNDLE
retrieval verify BUNDLE
retrieval score BUNDLE MANIFEST [--split test] [-k 10] [--json]
retrieval serve BUNDLE [--host 127.0.0.1] [--port 8000] [--token SECRET] [--backend SPEC]
retrieval push BUNDLE milvus://HOST:PORT/COLLECTION | milvus-lite:PATH[#COLLECTION]

search, info and score open the bundle read-only, so they run beside the one process that
holds it for writing (serve, index). Unreadable images are skipped and listed on stderr by
search and index alike. Exit codes: 0 done, 1 problems found (verify), 2 an error (one
``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.bundle.format import BundleBusyError, BundleError, ReadOnlyError
from retrieval.data.images import ImageLoadError, images_in_folder
from retrieval.data.manifest import folder_labels

EXIT_PROBLEMS, EXIT_ERROR, EXIT_INTERRUPTED = 1, 2, 130
EXIT_CODES = (
    "exit codes: 0 done (unreadable images are skipped and listed); 1 problems found "
    "(verify); 2 an error, printed as one 'error: ...' line"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrieval")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"


def _load(args: argparse.Namespace, **options: Any) -> Any:
    from retrieval.bundle.retriever import Retriever  # heavy imports only once a command runs

    return Retriever.load(args.bundle, runtime=args.runtime, threads=args.threads, **options)


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
            vectors.append(retriever.embed_pixels(np.stack(batch)))
            batch = []
    if batch:
        vectors.append(retriever.embed_pixels(np.stack(batch)))
    return readable, np.concatenate(vectors), unreadable


def _search(args: argparse.Namespace) -> int:
    with _load(args, read_only=True) as retriever:
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


def _index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    root = Path(args.folder)
    paths = images_in_folder(root)
    labels = folder_labels(paths, root, args.labels)
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
    with _load(args, read_only=True) as retriever:
        info = retriever.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("\n".join(_info_lines(info)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from retrieval.bundle.format import read_manifest, verify_files

    manifest = read_manifest(Path(args.bundle))  # not a bundle: an error (exit 2)
    try:  # a missing or altered file: a problem found (exit 1)
        verify_files(Path(args.bundle), manifest)
    except BundleError as err:
        print(f"problem: {err}")
        print("1 problem(s) found; the bundle cannot be loaded until the file is restored")
        return EXIT_PROBLEMS
    with _load(args) as retriever:
        problems = retriever.verify()
    for problem in problems:
        print(f"problem: {problem}")
    print("bundle OK" if not problems else f"{len(problems)} problem(s) found")
    return EXIT_PROBLEMS if problems else 0


def _score(args: argparse.Namespace) -> int:
    from retrieval.data.manifest import ManifestError, read_manifest, select_split
    from retrieval.evaluation.bundle_score import score_bundle

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
    with _load(args, read_only=True) as retriever:
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


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from retrieval.backends import parse_backend

    if args.backend:
        parse_backend(args.backend)  # a malformed spec fails before the model loads

    from retrieval.service import ServiceSettings, create_app
    from retrieval.service.budget import return_freed_images_to_the_os

    return_freed_images_to_the_os()

    settings = ServiceSettings(
        token=ServiceSettings.token_from(args.token),
        max_body_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        request_timeout_s=args.timeout,
        batch_size=args.batch_size,
        batch_wait_ms=args.batch_wait_ms,
        uploads_dir=Path(args.uploads) if args.uploads else None,
        cors_origins=tuple(args.cors_origin),
        decode_slots=args.decode_slots,
        decode_queue=args.decode_queue,
        decode_memory_mb=args.decode_memory_mb,
        max_requests=args.max_requests,
    )
    retriever = _load(args, max_pixels=args.max_pixels, backend=args.backend)
    try:
        app = create_app(retriever, settings)
        if args.backend:
            print(f"searching {args.backend} ({retriever.items.describe()['index_type']})")
        writes = "enabled (bearer token)" if settings.token else "disabled (no --token)"
        large = app.state.service.large
        print(
            f"serving {args.bundle}: {len(retriever)} items, {retriever.runtime.kind} runtime, "
            f"writes {writes}, {large.slots} large decode(s) at a time + {large.queue} "
            f"waiting, at most {settings.max_requests} uploads in flight\n  page  http://{args.host}:{args.port}/\n"
            f"  API   http://{args.host}:{args.port}/docs",
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        retriever.close()
    return 0


def _push(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from retrieval.backends import parse_backend
    from retrieval.backends.milvus import push_bundle

    spec = parse_backend(args.target)
    with tqdm(unit="item", disable=args.quiet) as bar:
        report = push_bundle(args.bundle, spec, batch_size=args.batch_size, progress=bar.update)
    print(
        f"pushed {report.pushed}, already there {report.present}, deleted {report.deleted}; "
        f"{spec.where} holds {report.total} items ({report.index['index_type']} index)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval", description="Search an exported bundle.", epilog=EXIT_CODES
    )
    parser.add_argument("--version", action="version", version=f"retrieval {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EXIT_CODES)
        p.add_argument("bundle", help="bundle folder written by export.py")
        p.add_argument(
            "--runtime",
            default="auto",
            choices=("auto", "onnx", "openvino", "torchscript", "eager"),
        )
        p.add_argument("--threads", type=int, default=None, help="model threads")
        return p

    p = command("search", "find the items most similar to each image")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("-k", type=int, default=10, help="results per image (default 10)")
    p.add_argument("--label", default=None, help="only items with this label")
    rerank_help = (
        "k-reciprocal re-ranking of the first results (default: as the bundle was exported)"
    )
    p.add_argument(
        "--rerank", action=argparse.BooleanOptionalAction, default=None, help=rerank_help
    )
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

    p = command("score", "search a manifest's query images in the bundle and score the hits")
    p.add_argument("manifest", help="manifest CSV whose split has is_query rows")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--root", default=None, help="folder of the manifest's relative paths")
    p.add_argument(
        "--rerank", action=argparse.BooleanOptionalAction, default=None, help=rerank_help
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_score)

    p = sub.add_parser(
        "push",
        help="upload the bundle's items and vectors to a Milvus collection (resumable)",
        description="Upload the bundle's items and vectors, with their ids, labels and extra "
        "fields, to a Milvus collection (created with an HNSW or IVF index sized to the "
        "bundle). Run it again after a crash: items already there are skipped.",
        epilog=EXIT_CODES,
    )
    p.add_argument("bundle", help="bundle folder written by export.py")
    p.add_argument("target", help="milvus://HOST:PORT/COLLECTION or milvus-lite:PATH[#COLLECTION]")
    p.add_argument("--batch-size", type=int, default=1000, help="items per request")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_push)

    p = command("serve", "answer searches over HTTP and serve the search page")
    p.add_argument(
        "--backend",
        default=None,
        help="search a Milvus collection filled by 'retrieval push' instead of the bundle's "
        "own index: milvus://HOST:PORT/COLLECTION or milvus-lite:PATH[#COLLECTION]",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token",
        default=None,
        help="bearer token that enables POST /items and DELETE /items/{id} "
        "(or set RETRIEVAL_TOKEN); without one, writes are disabled",
    )
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (w x h)")
    p.add_argument("--max-k", type=int, default=100, help="most results per search")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request gets 504")
    p.add_argument("--batch-size", type=int, default=16, help="most queries embedded together")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="wait for a batch to fill")
    p.add_argument("--uploads", default=None, help="folder for added images (BUNDLE/uploads)")
    p.add_argument(
        "--decode-slots",
        type=int,
        default=None,
        help="most large-image decodes at a time (default: min(cores, decode memory / "
        "(8 bytes x max pixels)))",
    )
    p.add_argument(
        "--decode-queue", type=int, default=8, help="large decodes waiting; more get 503"
    )
    p.add_argument(
        "--decode-memory-mb",
        type=float,
        default=None,
        help="memory large decodes may hold together (default 1/8 of RAM, at most 2048)",
    )
    p.add_argument(
        "--max-requests", type=int, default=32, help="uploads in the server at once; more get 503"
    )
    p.add_argument(
        "--cors-origin", action="append", default=[], help="web origin allowed to call the API"
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info"))
    p.set_defaults(run=_serve)
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except EXPECTED_ERRORS as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {text}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
