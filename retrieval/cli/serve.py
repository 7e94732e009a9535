"""``retrieval serve``: the HTTP search service and its page over a bundle (searched in the
bundle itself or in a Milvus collection filled by ``retrieval push``)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
from pathlib import Path
from typing import Any

from retrieval.cli.common import EXIT_ERROR, bundle_command, load


def _serve(args: argparse.Namespace) -> int:
    listener = listen(args.host, args.port)  # a taken port fails first, in well under a second
    try:
        return _serve_on(listener, args)
    finally:
        listener.close()


def _serve_on(listener: socket.socket, args: argparse.Namespace) -> int:
    from retrieval.backends import parse_backend

    if args.backend:
        parse_backend(args.backend)  # a malformed spec fails before the model loads

    from retrieval.infra.hardware import return_freed_images_to_the_os
    from retrieval.service import ServiceSettings, create_app

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
        max_receiving=args.max_receiving,
        body_grace_s=args.body_grace,
        body_min_rate=int(args.body_min_rate_kb * 1024),
    )
    retriever = load(args, max_pixels=args.max_pixels, backend=args.backend)
    try:
        app = create_app(retriever, settings)
        if args.backend:
            print(f"searching {args.backend} ({retriever.items.describe()['index_type']})")
        writes = "enabled (bearer token)" if settings.token else "disabled (no --token)"
        large = app.state.service.large
        print(
            f"serving {args.bundle}: {len(retriever)} items, {retriever.runtime.kind} runtime, "
            f"writes {writes}, {large.slots} large decode(s) at a time + {large.queue} "
            f"waiting, at most {settings.max_requests} uploads in flight\n"
            f"  page  http://{args.host}:{args.port}/\n"
            f"  API   http://{args.host}:{args.port}/docs",
            flush=True,
        )
        return _run(app, listener, args)
    finally:
        retriever.close()


def _run(app: Any, listener: socket.socket, args: argparse.Namespace) -> int:
    """Serve ``app`` on ``listener`` until a signal (as ``uvicorn.run`` does); 2 when the
    server did not start (uvicorn logs why)."""
    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a server normally
        server.run(sockets=[listener])
    return 0 if server.started else EXIT_ERROR


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); ValueError for a port out of
    1..65535 or a host that does not resolve; OSError naming the port and the fix when it is
    taken, naming the address otherwise."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be 1 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} does not resolve: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is in use; pick another with --port") from None
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.set_inheritable(True)
    return sock


def add_serve(sub: Any) -> None:
    """``retrieval serve BUNDLE [--host H] [--port P] [--token T] [--backend SPEC] ...``."""
    p = bundle_command(sub, "serve", "answer searches over HTTP and serve the search page")
    p.add_argument(
        "--backend",
        default=None,
        help="search a Milvus collection filled by 'retrieval push' instead of the bundle's "
        "own index: milvus://HOST:PORT/COLLECTION or milvus-lite:PATH[#COLLECTION]",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
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
    _add_limits(p)
    p.add_argument(
        "--cors-origin", action="append", default=[], help="web origin allowed to call the API"
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info"))
    p.set_defaults(run=_serve)


def _add_limits(p: Any) -> None:
    """The options that bound what a flood of requests may hold: decodes, uploads, bodies."""
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
        "--max-requests",
        type=int,
        default=32,
        help="uploads received whole and not yet answered; more get 503",
    )
    p.add_argument(
        "--max-receiving", type=int, default=128, help="upload bodies still arriving; more get 503"
    )
    p.add_argument(
        "--body-min-rate-kb",
        type=float,
        default=32.0,
        help="KiB/s a request body must keep after --body-grace seconds; slower gets 408",
    )
    p.add_argument("--body-grace", type=float, default=5.0, help="seconds before the rate counts")
