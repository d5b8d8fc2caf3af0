"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with the right status.

Handlers raise `APIError`; `install_error_handlers` turns it, request validation failures and
malformed JSON into that body, so a client sees the same shape whatever went wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error to report to the client, OpenAI-style."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect or missing API key.", code="invalid_api_key")


def rate_limited(message: str, code: str, retry_after: str) -> APIError:
    """429 with Retry-After (whole seconds), as OpenAI answers a key over its limits."""
    return APIError(429, message, type="rate_limit_error" if code != "token_quota" else "insufficient_quota",
                    code=code, headers={"Retry-After": retry_after})


def forbidden(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(403, message, type="permission_error", param=param, code=code)


def engine_unavailable(reason: str) -> APIError:
    return APIError(503, f"The engine is unavailable: {reason}", type="service_unavailable_error",
                    code="engine_unavailable")


NOT_AN_OBJECT = "The request body must be a JSON object (with Content-Type: application/json)."

BodyModel = TypeVar("BodyModel", bound=BaseModel)


async def read_body(request: Request, model: type[BodyModel]) -> BodyModel:
    """The request's JSON body as `model`, parsed and validated by pydantic in one pass; a body that
    is not JSON, not an object or not valid is a 400 naming the first bad field."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise bad_request(NOT_AN_OBJECT)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from None


def _validation_error(errors: Sequence[Any]) -> APIError:
    """The first of pydantic's errors (with FastAPI's leading "body" in their locations or not)."""
    if not errors:
        return bad_request("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"We could not parse the JSON body of your request: {first.get('msg')}")
    if tuple(part for part in first.get("loc", ()) if part != "body") == ():
        return bad_request(NOT_AN_OBJECT)
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    details = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5]
    )
    return bad_request(f"Invalid request: {details}", param=param)


class ClientDisconnected(Exception):
    """The client left before its full response was ready; its engine work was aborted."""


def handled_error_response(exc: Exception) -> Response | None:
    """The response to an error a handler raises on purpose (None: not one of those)."""
    if isinstance(exc, APIError):
        return exc.response()
    if isinstance(exc, ClientDisconnected):
        return Response(status_code=499)  # "client closed request": nobody reads it
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(APIError)
    async def _handled(_: Request, exc: Exception) -> Response:
        return handled_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()
