"""Errors: the one JSON shape every failure is answered with, and the handlers that give it.

Every error body is ``{"error": "<snake_case_code>", "message": "<what to do about it>"}``.
"""

import re
from typing import Any

from flask import Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge


class APIError(HTTPException):
    """An HTTP error with the snake_case code that the JSON error body carries."""

    def __init__(
        self, code: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(description=message)
        self.code = code
        self.error = error
        self.headers = headers or {}

    def get_headers(self, *args: Any) -> list[tuple[str, str]]:
        return list(self.headers.items())


def register_error_handlers(app: Flask) -> None:
    """Answer every HTTP error in the one JSON shape (store.init_app adds a store's failures)."""
    app.register_error_handler(HTTPException, handle_http_error)


def error_body(code: str, message: str | None) -> dict[str, str | None]:
    """Return the one JSON shape of every error."""
    return {"error": code, "message": message}


def after_colon(sentence: str) -> str:
    """Return a sentence to follow a colon in another: one sentence, no capital after it."""
    return sentence[:1].lower() + sentence[1:]


def body_too_large() -> APIError:
    """Return the 413 of a body over the bound, however it was framed (RFC 9110 §15.5.14)."""
    return APIError(413, "request_entity_too_large", "The request body is over 64 KiB.")


def handle_http_error(error: HTTPException) -> Response:
    """Answer an HTTP error, ours or Flask's, with the JSON shape."""
    if isinstance(error, RequestEntityTooLarge):  # Werkzeug's own, from Content-Length
        error = body_too_large()
    code = getattr(error, "error", None) or error_code(error.name or "error")
    response = jsonify(error_body(code, error.description))
    response.status_code = error.code or 500
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def error_code(reason: str) -> str:
    """Return the snake_case code of an HTTP reason phrase: "Not Found" is not_found."""
    return re.sub(r"\W+", "_", reason.lower())


def store_unavailable(error: Exception) -> Response:
    """Fail closed: without the store's word no token is issued or accepted. The handler of
    each error a store raises when it does not answer (its ``unavailable``)."""
    current_app.logger.error("The store failed: %s", type(error).__name__)
    message = "The session store is not answering. Try again in a few seconds."
    # RFC 9110 §10.2.3: Retry-After tells a client when a 503 may be over.
    return handle_http_error(APIError(503, "store_unavailable", message, {"Retry-After": "5"}))
