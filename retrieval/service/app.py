"""The HTTP API and the web page: ``create_app(retriever, settings)`` gives an ASGI app.

Routes: ``GET /`` (the page, its icon at ``/favicon.ico``), ``POST /search``,
``GET /items/{id}``, ``GET /items/{id}/similar``, ``GET /items/{id}/thumbnail``,
``GET /items/{id}/image``, ``POST /items`` and ``DELETE /items/{id}`` (bearer token),
``GET /healthz``, ``GET /stats``; the OpenAPI schema at ``/openapi.json`` and its pages at
``/docs``. Errors are JSON ``{"detail": ...}`` with a 4xx status for anything wrong with the
request. Searches page through one ranking with ``offset`` (``offset + k`` at most ``max_k``).
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at run
# time, and K below is local to create_app.
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from retrieval.bundle.retriever import Hit, Retriever
from retrieval.data.images import ImageLoadError, ImageTooLargeError
from retrieval.service.budget import Busy, Deadline, DeadlineExceeded
from retrieval.service.core import BadUpload, SearchService
from retrieval.service.guard import RequestGuard
from retrieval.service.settings import TOKEN_ENV, ServiceSettings

STATIC = Path(__file__).parent / "static"
ItemId = Annotated[int, PathParam(ge=0, le=2**62, description="an item id from a search result")]
LabelFilter = Annotated[str | None, Query(max_length=256, description="only items with this label")]
RerankOption = Annotated[
    bool | None,
    Query(description="k-reciprocal re-ranking of the first results (default: as exported)"),
]


class ErrorBody(BaseModel):
    """Every error the service answers: what is wrong and, where it helps, how to fix it."""

    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "empty upload or unreadable body",
        401: "missing or wrong bearer token",
        403: "writes are disabled (no token configured)",
        404: "no such item, or its image is not on this server",
        413: "body or image over the limits",
        415: "the upload is not an accepted image format",
        422: "invalid parameters, or an image that cannot be decoded",
        503: "busy: too many uploads or decodes waiting; retry after Retry-After seconds",
        504: "the request took too long",
    }
    return {code: {"model": ErrorBody, "description": reasons[code]} for code in codes}


SEARCH_ERRORS = _errors(400, 413, 415, 422, 503, 504)
ITEM_ERRORS = _errors(404, 422, 503, 504)
WRITE_ERRORS = _errors(400, 401, 403, 404, 413, 415, 422, 503, 504)


def _deadline(request: Request) -> Deadline:
    """The request's deadline, set by RequestGuard (a fresh one if the app runs without it)."""
    found = getattr(request.state, "deadline", None)
    return found if isinstance(found, Deadline) else Deadline.after(30.0)


def _hit(hit: Hit) -> dict[str, Any]:
    return {
        "id": hit.id,
        "score": round(hit.score, 6),
        "label": hit.label,
        "name": Path(hit.uri).name,
        "thumbnail": f"/items/{hit.id}/thumbnail",
        "image": f"/items/{hit.id}/image",
        "extra": hit.extra,
    }


def _answer(
    k: int, label: str | None, start: float, page: tuple[list[Hit], bool], offset: int, max_k: int
) -> dict[str, Any]:
    """A search's JSON: what was asked, how long it took since ``start``, the results and
    the offset of the next page (None when the ranking ends there or ``max_k`` is reached)."""
    hits, more = page
    took = round((time.perf_counter() - start) * 1000.0, 2)
    after = offset + len(hits)
    return {
        "k": k,
        "offset": offset,
        "label": label,
        "took_ms": took,
        "results": [_hit(h) for h in hits],
        "next_offset": after if more and after < max_k else None,
    }


def create_app(retriever: Retriever, settings: ServiceSettings | None = None) -> FastAPI:
    """The service over an open ``retriever`` (closed when the app shuts down)."""
    settings = settings or ServiceSettings()
    service = SearchService(retriever, settings)
    K = Annotated[int, Query(ge=1, le=settings.max_k, description="results to return")]
    Offset = Annotated[
        int,
        Query(
            ge=0, lt=settings.max_k, description=f"results to skip; offset + k <= {settings.max_k}"
        ),
    ]

    def check_page(k: int, offset: int) -> None:
        if offset + k > settings.max_k:
            raise HTTPException(
                422,
                f"offset + k is {offset + k}, over this server's {settings.max_k} results per "
                f"ranking: ask for k={settings.max_k - offset} or fewer",
            )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.batcher.aclose()

    app = FastAPI(
        title="Image retrieval",
        summary="Search a bundle of images by example",
        version=str(retriever.manifest.get("format_version")),
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        timeout_s=settings.request_timeout_s,
        stats=service.stats,
        max_requests=settings.max_requests,
    )
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization"],
        )

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

    bearer = HTTPBearer(auto_error=False, description=f"the token given by --token or {TOKEN_ENV}")

    def writer(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if settings.token is None:
            raise HTTPException(
                403, f"writes are disabled: start the server with --token or set {TOKEN_ENV}"
            )
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(
                401,
                "a valid bearer token is required (header 'Authorization: Bearer TOKEN')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def lookup(item_id: int) -> Any:
        try:
            return retriever.item(item_id)
        except KeyError:
            raise HTTPException(404, f"no item with id {item_id}") from None

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

    @app.post(
        "/search",
        summary="Find the items most similar to an uploaded image",
        responses=SEARCH_ERRORS,
    )
    async def search(
        request: Request,
        image: Annotated[UploadFile, File(description="the query image")],
        k: K = 10,
        label: LabelFilter = None,
        rerank: RerankOption = None,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        start, deadline = time.perf_counter(), _deadline(request)
        check_page(k, offset)
        data = await image.read()
        vector = await service.embed_upload(data, image.filename or "image", deadline)
        page = await service.search(vector, k, label, rerank, deadline, offset)
        return _answer(k, label, start, page, offset, settings.max_k)

    @app.get("/items/{item_id}", summary="One item's record", responses=ITEM_ERRORS)
    async def item(item_id: ItemId) -> dict[str, Any]:
        found = await run_in_threadpool(lookup, item_id)
        return {
            "id": found.id,
            "label": found.label,
            "name": Path(found.uri).name,
            "extra": found.extra,
            "added_at": found.added_at,
            "thumbnail": f"/items/{found.id}/thumbnail",
            "image": f"/items/{found.id}/image",
        }

    @app.get(
        "/items/{item_id}/similar",
        summary="The items most similar to an item",
        responses=ITEM_ERRORS,
    )
    async def similar(
        request: Request,
        item_id: ItemId,
        k: K = 10,
        label: LabelFilter = None,
        rerank: RerankOption = None,
        offset: Offset = 0,
        exclude_self: Annotated[
            bool, Query(description="leave the item itself out of its results")
        ] = False,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        check_page(k, offset)
        found = await run_in_threadpool(lookup, item_id)
        exclude = found.id if exclude_self else None
        page = await service.search(
            found.vector, k, label, rerank, _deadline(request), offset, exclude
        )
        return _answer(k, label, start, page, offset, settings.max_k)

    @app.get(
        "/items/{item_id}/thumbnail",
        summary="A JPEG thumbnail of an item",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **ITEM_ERRORS},
    )
    async def thumbnail(request: Request, item_id: ItemId) -> Response:
        found = await run_in_threadpool(lookup, item_id)
        try:
            data = service.thumbnails.cached(found.id, found.uri) or await service.large.run(
                lambda: service.thumbnails.get(found.id, found.uri), _deadline(request)
            )
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from None
        except ImageLoadError:
            raise HTTPException(404, f"item {item_id}'s image can no longer be read") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get(
        "/items/{item_id}/image",
        summary="An item's full image (its file; a JPEG of it for formats browsers do not show)",
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}, **_errors(404, 413, 422, 503, 504)},
    )
    async def full_image(request: Request, item_id: ItemId) -> Response:
        found, deadline = await run_in_threadpool(lookup, item_id), _deadline(request)
        headers = {"Cache-Control": "max-age=3600"}
        try:  # the file from the bundle's own record of the item, never from the request
            path, media_type = await service.small.run(
                lambda: service.thumbnails.full(found.id, found.uri), deadline
            )
            if media_type is not None:
                return FileResponse(path, media_type=media_type, headers=headers)
            data = await service.large.run(lambda: service.thumbnails.as_jpeg(path), deadline)
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from None
        except ImageTooLargeError:
            raise HTTPException(
                413, f"item {item_id}'s image is over this server's {settings.max_pixels:,} pixels"
            ) from None
        except ImageLoadError:
            raise HTTPException(404, f"item {item_id}'s image can no longer be read") from None
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.post(
        "/items",
        summary="Add images (bearer token)",
        status_code=201,
        dependencies=[Depends(writer)],
        responses={200: {"description": "every image was already in the bundle"}, **WRITE_ERRORS},
    )
    async def add_items(
        request: Request,
        images: Annotated[list[UploadFile], File(description="one or more images")],
        labels: Annotated[
            list[str] | None, Form(description="one label for all images, or one per image")
        ] = None,
    ) -> JSONResponse:
        if len(images) > settings.max_files:
            raise HTTPException(413, f"at most {settings.max_files} images per request")
        given = labels or []
        if len(given) not in (0, 1, len(images)):
            raise HTTPException(
                422, f"{len(given)} labels for {len(images)} images: give one, or one per image"
            )
        per_image = (
            given if len(given) == len(images) else [given[0] if given else None] * len(images)
        )
        uploads = [(f.filename or f"image {i}", await f.read()) for i, f in enumerate(images)]
        per_image = [lab or None for lab in per_image]
        outcome = await service.large.run(  # decodes one image at a time; not abandoned
            lambda: service.add(uploads, per_image), _deadline(request), abandon=False
        )
        status = 201 if outcome.added else 200 if outcome.duplicates else 422
        body = {
            "added": outcome.added,
            "duplicates": outcome.duplicates,
            "rejected": outcome.rejected,
            "items": len(retriever),
        }
        if status == 422:
            body["detail"] = "no image was added: " + "; ".join(
                f"{r['name']}: {r['reason']}" for r in outcome.rejected
            )
        return JSONResponse(body, status_code=status)

    @app.delete(
        "/items/{item_id}",
        summary="Remove an item (bearer token)",
        dependencies=[Depends(writer)],
        responses=WRITE_ERRORS,
    )
    async def remove_item(item_id: ItemId) -> dict[str, Any]:
        try:
            await run_in_threadpool(service.remove, item_id)
        except KeyError:
            raise HTTPException(404, f"no item with id {item_id}") from None
        return {"removed": item_id, "items": len(retriever)}

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
            },
            "decodes": {"large": service.large.snapshot(), "small": service.small.snapshot()},
            **service.stats.snapshot(),
        }

    return app
