"""The routes that change the bundle, ``POST /items`` and ``DELETE /items/{id}``, behind the
bearer token."""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at run time.
import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from retrieval.search.duplicate_finder import Threshold
from retrieval.service.api import WRITE_ERRORS, ItemId, deadline
from retrieval.service.core import AddOutcome, SearchService
from retrieval.service.settings import TOKEN_ENV

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


def _form_images(form: FormData, max_files: int) -> list[UploadFile]:
    """The files of the form field ``images``: 422 when there are none or text among them,
    413 over ``max_files``."""
    images = form.getlist("images")
    if not images or not all(isinstance(f, UploadFile) for f in images):
        raise HTTPException(422, "the form field 'images' must hold one or more image files")
    if len(images) > max_files:
        raise HTTPException(413, f"at most {max_files} images per request")
    return [f for f in images if isinstance(f, UploadFile)]


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
