"""The HTTP API and the web page: ``create_app(retriever, settings)`` gives an ASGI app.

Routes: ``GET /`` (the page, its icon at ``/favicon.ico``), ``POST /search``, ``GET
/items/{id}``, ``GET /items/{id}/similar``, ``GET /items/{id}/thumbnail``, ``GET
/items/{id}/image``, ``GET /duplicates``, ``POST /items`` and ``DELETE /items/{id}`` (bearer
token; all in :mod:`~retrieval.service.routes`), ``GET /healthz``, ``GET /stats``; the OpenAPI
schema at ``/openapi.json`` and its pages at ``/docs``. Errors are JSON ``{"detail": ...}``
with a 4xx status for anything wrong with the request, 503 when busy, 507 when the disk is
full, and 500 (the connection then closed) for a bug. Searches page through one ranking
with ``offset`` (``offset + k`` at most ``max_k``).
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at run time.
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from retrieval.data.images import ImageLoadError
from retrieval.search import Retriever
from retrieval.service.budget import Busy, DeadlineExceeded
from retrieval.service.guard import RequestGuard
from retrieval.service.routes import (
    add_duplicate_routes,
    add_item_routes,
    add_search_routes,
    add_write_routes,
)
from retrieval.service.search_service import BadUpload, OutOfSpace, SearchService
from retrieval.service.settings import ServiceSettings

STATIC = Path(__file__).parent / "static"


def _add_error_handlers(app: FastAPI) -> None:
    """JSON ``{"detail": ...}`` answers for the service's own exceptions."""

    @app.exception_handler(BadUpload)
    async def bad_upload(_: Request, err: BadUpload) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(Busy)
    async def busy(_: Request, err: Busy) -> JSONResponse:
        headers = {"Retry-After": str(err.retry_after)}
        return JSONResponse({"detail": str(err)}, status_code=503, headers=headers)

    @app.exception_handler(DeadlineExceeded)
    async def too_late(_: Request, err: DeadlineExceeded) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=504)

    @app.exception_handler(ImageLoadError)
    async def bad_image(_: Request, err: ImageLoadError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(OutOfSpace)
    async def out_of_space(_: Request, err: OutOfSpace) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=507)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        """A bug: 500, and the connection closed (the server drops it after an unhandled
        error; the header tells the client not to send its next request on it)."""
        detail = f"internal error ({type(err).__name__}); the server log has the details"
        return JSONResponse({"detail": detail}, status_code=500, headers={"Connection": "close"})


def _add_page_routes(app: FastAPI) -> None:
    """The search page, its icon and its static files."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(
            STATIC / "favicon.svg",
            media_type="image/svg+xml",
            headers={"Cache-Control": "max-age=86400"},
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_api_page(app)


def _add_api_page(app: FastAPI) -> None:
    """``GET /docs``: the interactive API page, its script and style served from the
    ``swagger-ui-bundle`` package (no CDN: it works on a machine without internet)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    @app.get("/docs", include_in_schema=False)
    async def api_page() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
        )

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")


def _add_status_routes(app: FastAPI, service: SearchService) -> None:
    """``GET /healthz`` and ``GET /stats``."""
    retriever, settings = service.retriever, service.settings

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "items": len(retriever)}

    @app.get("/stats", summary="Items, model, index, request counts and latency")
    async def stats() -> dict[str, Any]:
        info = retriever.info()
        return {
            "items": len(retriever),
            "dim": retriever.dim,
            "index": info["index"],
            "backend": info["backend"],
            "runtime": info["runtime"],
            "backbone": info["backbone"],
            "postprocess": info["postprocess"],
            "writes_enabled": settings.token is not None,
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_pixels": settings.max_pixels,
                "max_k": settings.max_k,
                "max_requests": settings.max_requests,
                "max_receiving": settings.max_receiving,
                "body_grace_s": settings.body_grace_s,
                "body_min_rate": settings.body_min_rate,
            },
            "uploads": service.upload_slots.snapshot(),
            "decodes": {"large": service.large.snapshot(), "small": service.small.snapshot()},
            **service.stats.snapshot(),
        }


def create_app(retriever: Retriever, settings: ServiceSettings | None = None) -> FastAPI:
    """The service over an open ``retriever`` (closed when the app shuts down)."""
    settings = settings or ServiceSettings()
    service = SearchService(retriever, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.batcher.aclose()

    app = FastAPI(
        title="Image retrieval",
        summary="Search a bundle of images by example",
        version=str(retriever.manifest.get("format_version")),
        lifespan=lifespan,
        docs_url=None,  # served by _add_page_routes from the installed swagger-ui, offline
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        timeout_s=settings.request_timeout_s,
        stats=service.stats,
        slots=service.upload_slots,
        body_grace_s=settings.body_grace_s,
        body_min_rate=settings.body_min_rate,
    )
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization"],
        )
    _add_error_handlers(app)
    _add_page_routes(app)
    add_search_routes(app, service)
    add_item_routes(app, service)
    add_duplicate_routes(app, service)
    add_write_routes(app, service)
    _add_status_routes(app, service)
    return app
