"""OpenAI-shaped HTTP answers of rayvllm_nb's own making (the replicas' guard, the shared router)."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

from rayvllm_nb._internal.serve_haproxy import RETRY_AFTER_S

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    415: "UnsupportedMediaTypeError",
    503: "ServiceUnavailableError",
}
WRONG_KEY = "Missing or wrong API key: send it as `Authorization: Bearer KEY` (the OpenAI client's api_key)."


def error_response(status: int, message: str, param: str | None = None, *, retry_after: bool = False) -> JSONResponse:
    """An OpenAI-shaped error body with ``status`` (and ``Retry-After`` when the client should retry)."""
    kind = _ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry_after else None
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status,
        headers=headers,
    )


def expected_authorization(api_key: str | None) -> bytes | None:
    """The ``Authorization`` header value requests must carry (None: no key required)."""
    return f"Bearer {api_key}".encode() if api_key else None


def authorized(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> bool:
    """Whether an ASGI scope's ``headers`` carry the expected ``Authorization`` (constant-time)."""
    return expected is None or hmac.compare_digest(dict(headers).get(b"authorization", b""), expected)
