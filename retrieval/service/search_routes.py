"""``POST /search``, and the JSON of a search's page of results (also ``/items/{id}/similar``'s)."""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at run
# time, and K below is local to add_search_routes.
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Request, UploadFile

from retrieval.search.results import Hit
from retrieval.service.api import (
    SEARCH_ERRORS,
    LabelFilter,
    RerankOption,
    check_page,
    deadline,
    k_query,
    offset_query,
)
from retrieval.service.core import SearchService


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
