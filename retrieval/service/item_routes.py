"""The routes of one item: its record, its most similar items, its thumbnail and its image."""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at run
# time, and K below is local to add_item_routes.
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from retrieval.data.images import ImageLoadError, ImageTooLargeError
from retrieval.service.api import (
    ITEM_ERRORS,
    ItemId,
    LabelFilter,
    RerankOption,
    check_page,
    deadline,
    errors,
    k_query,
    offset_query,
)
from retrieval.service.core import SearchService
from retrieval.service.search_routes import answer


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


def add_item_routes(app: FastAPI, service: SearchService) -> None:
    """``GET /items/{id}``, ``/items/{id}/similar``, ``/items/{id}/thumbnail`` and
    ``/items/{id}/image``."""
    retriever, settings = service.retriever, service.settings
    K = Annotated[int, k_query(settings.max_k)]
    Offset = Annotated[int, offset_query(settings.max_k)]

    def lookup(item_id: int) -> Any:
        try:
            return retriever.item(item_id)
        except KeyError:
            raise HTTPException(404, f"no item with id {item_id}") from None

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
        try:  # the file from the bundle's own record of the item, never from the request
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
