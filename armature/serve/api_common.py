"""What every route of the generator's HTTP API shares: the error answer and the adapter names.

An error answer has the OpenAI API's shape, ``{"error": {"message", "type", "param", "code"}}``,
plus ``field`` (the same as ``param``) for Armature's older clients.
"""

from typing import Optional

from fastapi.responses import JSONResponse

__all__ = ["ADAPTER_PATTERN", "CODES", "MAX_SEED", "ApiError", "error_response"]

# name, name/3 or name@alias (MLflow registered model names, restricted to a safe alphabet)
ADAPTER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[0-9]{1,9}|@[A-Za-z0-9_-]{1,64})?$"
MAX_SEED = 2**32 - 1
CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "too_large",
    429: "too_many_requests",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An answer other than 200, naming the request field at fault (or what else failed)."""

    def __init__(
        self, status: int, field: str, message: str, headers: Optional[dict] = None, code: Optional[str] = None
    ):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers
        self.code = code or CODES.get(status, "error")


def error_response(
    status: int, code: str, field: str, message: str, headers: Optional[dict] = None, **extra
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"  # the OpenAI API's error types
    body = {"error": {"message": message, "type": kind, "param": field, "code": code, "field": field, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)
