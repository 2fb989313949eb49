"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from tokenmill.sampling_params import InvalidRequestError


class APIError(Exception):
    """An error reply for the client; raised anywhere in request handling, rendered by the app."""

    def __init__(self, status_code: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or default_type(status_code)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def default_type(status_code: int) -> str:
    if status_code >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def invalid_request(exc: InvalidRequestError, param: str | None = None) -> APIError:
    """The 400 for an engine-side validation error, under the API's name for the field (default: the engine's)."""
    param = param or exc.field
    return bad_request(f"{param}: {exc.message}", param)
