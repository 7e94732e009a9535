"""What the routes share: the error bodies the OpenAPI schema documents, the parameter types
of item ids, labels, re-ranking and pages, and the request's deadline."""

from typing import Annotated, Any

from fastapi import HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel

from retrieval.search.adding import MAX_LABEL
from retrieval.service.budget import Deadline

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
