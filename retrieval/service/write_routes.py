"""The routes that change the bundle, ``POST /items`` and ``DELETE /items/{id}``, behind the
bearer token."""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at run time.
import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from retrieval.service.api import WRITE_ERRORS, ItemId, deadline
from retrieval.service.core import SearchService
from retrieval.service.settings import TOKEN_ENV


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
            lambda: service.add(uploads, per_image), deadline(request), abandon=False
        )
        status = 201 if outcome.added else 200 if outcome.duplicates else 422
        threshold = service.duplicate_threshold
        body = {
            "added": outcome.added,
            "duplicates": outcome.duplicates,
            "rejected": outcome.rejected,
            "items": len(retriever),
            # already in the bundle above its duplicate threshold (null: no calibration)
            "duplicate_threshold": threshold.value if threshold else None,
            "near_duplicates": outcome.near,
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
