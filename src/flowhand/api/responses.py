"""From an HTTP response to a typed model, or to the error that says what went wrong."""

from __future__ import annotations

from typing import TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from flowhand.errors import APIResponseError, APIStatusError, AuthError, Conflict, NotFound

M = TypeVar("M", bound=BaseModel)


def error_detail(response: httpx.Response) -> str:
    """The server's `detail`, or the start of the body, for an error message."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]


def status_error(method: str, path: str, response: httpx.Response) -> APIStatusError:
    """The error for a non-retryable status: NotFound, Conflict, AuthError or APIStatusError."""
    code = response.status_code
    cls: type[APIStatusError] = APIStatusError
    if code == 404:
        cls = NotFound
    elif code == 409:
        cls = Conflict
    elif code in (401, 403):
        cls = AuthError
    return cls(code, method, path, error_detail(response))


def parse_model(model: type[M], response: httpx.Response) -> M:
    """The body as `model`; APIResponseError when it does not fit."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise APIResponseError(
            f"{response.request.method} {response.request.url.path}: unexpected body for "
            f"{model.__name__} ({exc.error_count()} errors): {response.text[:200]!r}"
        ) from exc


def parse_list(model: type[M], response: httpx.Response) -> list[M]:
    """The body as a list of `model`; APIResponseError when it does not fit."""
    try:
        return TypeAdapter(list[model]).validate_json(response.content)  # type: ignore[valid-type]
    except ValidationError as exc:
        raise APIResponseError(
            f"{response.request.method} {response.request.url.path}: unexpected body for "
            f"list[{model.__name__}] ({exc.error_count()} errors): {response.text[:200]!r}"
        ) from exc
