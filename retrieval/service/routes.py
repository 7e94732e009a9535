"""The HTTP routes of the service, on :class:`~retrieval.service.search_service.SearchService`:
``POST /search`` and the JSON of a page of results; one item's record, its most similar items,
its thumbnail and its image; ``GET /duplicates``; and, behind the bearer token, ``POST
/items`` and ``DELETE /items/{id}``. What the routes share: the error bodies the OpenAPI
schema documents, the parameter types of item ids, labels, re-ranking and pages, and the
request's deadline.
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at run
# time, and the parameter types local to the add_*_routes functions with them.
import hmac
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as FormFile

from retrieval.data.images import ImageLoadError, ImageTooLargeError
from retrieval.search.adding import MAX_LABEL
from retrieval.search.duplicate_finder import Threshold
from retrieval.search.retriever import Hit
from retrieval.service.budget import Deadline
from retrieval.service.search_service import AddOutcome, SearchService
from retrieval.service.settings import TOKEN_ENV

ItemId = Annotated[int, PathParam(ge=0, le=2**62, description="an item id from a search result")]


LabelFilter = Annotated[
    str | None, Query(max_length=MAX_LABEL, description="only items with this label")
]


RerankOption = Annotated[
    bool | None,
    Query(description="k-reciprocal re-ranking of the first results (default: as exported)"),
]


class ErrorBody(BaseModel):
    """Every error the service answers: what is wrong and, where it helps, how to fix it."""

    detail: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of these error statuses."""
    reasons = {
        400: "empty upload or unreadable body",
        401: "missing or wrong bearer token",
        403: "writes are disabled (no token configured)",
        404: "no such item, or its image is not on this server",
        408: "the request body came slower than the server's minimum rate",
        413: "body or image over the limits",
        415: "the upload is not an accepted image format",
        422: "invalid parameters, or an image that cannot be decoded",
        503: "busy: too many uploads or decodes waiting; retry after Retry-After seconds",
        504: "the request took too long",
        507: "the server's disk is full: nothing was written",
    }
    return {code: {"model": ErrorBody, "description": reasons[code]} for code in codes}


SEARCH_ERRORS = errors(400, 408, 413, 415, 422, 503, 504)


ITEM_ERRORS = errors(404, 422, 503, 504)


WRITE_ERRORS = errors(400, 401, 403, 404, 408, 413, 415, 422, 503, 504, 507)


def k_query(max_k: int) -> Any:
    """The ``k`` query parameter of a server of ``max_k`` results per ranking."""
    return Query(ge=1, le=max_k, description="results to return")


def offset_query(max_k: int) -> Any:
    """The ``offset`` query parameter of a server of ``max_k`` results per ranking."""
    return Query(ge=0, lt=max_k, description=f"results to skip; offset + k <= {max_k}")


def check_page(k: int, offset: int, max_k: int) -> None:
    """422 unless the page ends within the server's ``max_k`` results per ranking."""
    if offset + k > max_k:
        raise HTTPException(
            422,
            f"offset + k is {offset + k}, over this server's {max_k} results per "
            f"ranking: ask for k={max_k - offset} or fewer",
        )


def deadline(request: Request) -> Deadline:
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


def answer(
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


def add_search_routes(app: FastAPI, service: SearchService) -> None:
    """``POST /search``: an uploaded image's most similar items, a page of one ranking."""
    max_k = service.settings.max_k
    K = Annotated[int, k_query(max_k)]
    Offset = Annotated[int, offset_query(max_k)]

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
        start, until = time.perf_counter(), deadline(request)
        check_page(k, offset, max_k)
        data = await image.read()
        vector = await service.embed_upload(data, image.filename or "image", until)
        page = await service.search(vector, k, label, rerank, until, offset)
        return answer(k, label, start, page, offset, max_k)


def _duplicate_group(group: Any, ids: list[int]) -> list[dict[str, Any]]:
    """One duplicate group as the service shows it: item ids and names, not file paths."""
    return [
        {
            "id": ids[m.row],
            "name": Path(m.path).name,
            **{key: shown[key] for key in ("kind", "score", "keep", "width", "height", "bytes")},
            "thumbnail": f"/items/{ids[m.row]}/thumbnail",
        }
        for m, shown in zip(group.members, group.to_list(), strict=True)
    ]


def add_duplicate_routes(app: FastAPI, service: SearchService) -> None:
    """``GET /duplicates``: the groups of copies among the items, a page at a time."""

    @app.get(
        "/duplicates",
        summary="Groups of exact and near copies among the items, the one to keep first",
        responses=errors(422, 503, 504),
    )
    async def duplicates(
        request: Request,
        offset: Annotated[int, Query(ge=0, description="groups to skip")] = 0,
        limit: Annotated[int, Query(ge=1, le=100, description="groups to return")] = 20,
        threshold: Annotated[
            float | None,
            Query(ge=-1.0, le=1.0, description="cosine similarity (default: calibrated)"),
        ] = None,
        keep: Annotated[
            str, Query(pattern="^(largest|oldest|newest|path)$", description="keeper rule")
        ] = "largest",
    ) -> dict[str, Any]:
        try:  # one grouping at a time, in the large lane: a flood queues or gets 503
            report = await service.large.run(
                lambda: service.duplicates(threshold, keep), deadline(request)
            )
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        page = report.groups[offset : offset + limit]
        after = offset + len(page)
        return {
            "threshold": report.threshold,
            "threshold_source": report.threshold_source,
            "total": len(report.groups),
            "offset": offset,
            "groups": [_duplicate_group(g, report.ids) for g in page],
            "next_offset": after if after < len(report.groups) else None,
        }


def _lookup(service: SearchService, item_id: int) -> Any:
    """The item ``item_id`` of the service's bundle; 404 when there is none."""
    try:
        return service.retriever.item(item_id)
    except KeyError:
        raise HTTPException(404, f"no item with id {item_id}") from None


def add_item_routes(app: FastAPI, service: SearchService) -> None:
    """``GET /items/{id}`` and ``/items/{id}/similar``; and the item's pictures
    (:func:`add_item_image_routes`)."""
    settings = service.settings
    K = Annotated[int, k_query(settings.max_k)]
    Offset = Annotated[int, offset_query(settings.max_k)]

    def lookup(item_id: int) -> Any:
        return _lookup(service, item_id)

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
        check_page(k, offset, settings.max_k)
        found = await run_in_threadpool(lookup, item_id)
        exclude = found.id if exclude_self else None
        page = await service.search(
            found.vector, k, label, rerank, deadline(request), offset, exclude
        )
        return answer(k, label, start, page, offset, settings.max_k)

    add_item_image_routes(app, service)


def add_item_image_routes(app: FastAPI, service: SearchService) -> None:
    """``GET /items/{id}/thumbnail`` and ``/items/{id}/image``: the pictures come from the
    bundle's own record of the item, never from a path in the request."""
    settings = service.settings

    def lookup(item_id: int) -> Any:
        return _lookup(service, item_id)

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
                lambda: service.thumbnails.get(found.id, found.uri), deadline(request)
            )
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from None
        except ImageLoadError:
            raise HTTPException(404, f"item {item_id}'s image can no longer be read") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get(
        "/items/{item_id}/image",
        summary="An item's full image (its file; for formats browsers do not show, a JPEG of "
        "it, or a PNG when it is too long for a JPEG)",
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}, **errors(404, 413, 422, 503, 504)},
    )
    async def full_image(request: Request, item_id: ItemId) -> Response:
        found, until = await run_in_threadpool(lookup, item_id), deadline(request)
        headers = {"Cache-Control": "max-age=3600"}
        try:
            path, media_type = await service.small.run(
                lambda: service.thumbnails.full(found.id, found.uri), until
            )
            if media_type is not None:
                return FileResponse(path, media_type=media_type, headers=headers)
            data, media_type = await service.large.run(
                lambda: service.thumbnails.converted(path), until
            )
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from None
        except ImageTooLargeError:
            raise HTTPException(
                413, f"item {item_id}'s image is over this server's {settings.max_pixels:,} pixels"
            ) from None
        except ImageLoadError:
            raise HTTPException(404, f"item {item_id}'s image can no longer be read") from None
        return Response(data, media_type=media_type, headers=headers)


#: The OpenAPI description of ``POST /items``'s form (the route reads it itself, once the
#: token is checked)
ADD_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images",
                        },
                        "labels": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "one label for all images, or one per image",
                        },
                    },
                }
            }
        },
    }
}


def add_write_routes(app: FastAPI, service: SearchService) -> None:
    """``POST /items`` and ``DELETE /items/{id}``: 403 without a configured token, 401
    without the right one."""
    retriever, settings = service.retriever, service.settings
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

    @app.post(
        "/items",
        summary="Add images (bearer token)",
        status_code=201,
        dependencies=[Depends(writer)],  # the token is checked before the body is read
        responses={200: {"description": "every image was already in the bundle"}, **WRITE_ERRORS},
        openapi_extra=ADD_FORM,
    )
    async def add_items(request: Request) -> JSONResponse:
        async with request.form() as form:
            images = _form_images(form, settings.max_files)
            per_image = _form_labels(form, len(images))
            uploads = [(f.filename or f"image {i}", await f.read()) for i, f in enumerate(images)]
        outcome = await service.large.run(  # decodes one image at a time; not abandoned
            lambda: service.add(uploads, per_image), deadline(request), abandon=False
        )
        return _added(outcome, len(retriever), service.duplicate_threshold)

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


def _form_images(form: FormData, max_files: int) -> list[FormFile]:
    """The files of the form field ``images``: 422 when there are none or text among them,
    413 over ``max_files``."""
    images = form.getlist("images")
    if not images or not all(isinstance(f, FormFile) for f in images):
        raise HTTPException(422, "the form field 'images' must hold one or more image files")
    if len(images) > max_files:
        raise HTTPException(413, f"at most {max_files} images per request")
    return [f for f in images if isinstance(f, FormFile)]


def _form_labels(form: FormData, count: int) -> list[str | None]:
    """One label per image from the form field ``labels`` (none, one for all, or one per
    image; an empty one is no label); 422 for files or another number of them."""
    given = form.getlist("labels")
    if not all(isinstance(label, str) for label in given):
        raise HTTPException(422, "the form field 'labels' must hold text, not files")
    if len(given) not in (0, 1, count):
        raise HTTPException(
            422, f"{len(given)} labels for {count} images: give one, or one per image"
        )
    labels = [str(label) or None for label in given]
    return labels if len(labels) == count else [labels[0] if labels else None] * count


def _added(outcome: AddOutcome, items: int, threshold: Threshold | None) -> JSONResponse:
    """The answer of ``POST /items``: 201 when an image was added, 200 when all were already
    there, 422 when none could be added (the reasons in ``detail``)."""
    status = 201 if outcome.added else 200 if outcome.duplicates else 422
    body = {
        "added": outcome.added,
        "duplicates": outcome.duplicates,
        "rejected": outcome.rejected,
        "items": items,
        # already in the bundle above its duplicate threshold (null: no calibration)
        "duplicate_threshold": threshold.value if threshold else None,
        "near_duplicates": outcome.near,
    }
    if status == 422:
        body["detail"] = "no image was added: " + "; ".join(
            f"{r['name']}: {r['reason']}" for r in outcome.rejected
        )
    return JSONResponse(body, status_code=status)
