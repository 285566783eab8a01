"""HTTP plumbing of the deployment, free of Ray: bounded body reading, strict JSON, the error answers,
and a proxy-side body limit.

Bodies: a request announcing more than ``MAX_BODY_BYTES`` (Content-Length) is refused before a byte
of it is read, and a body without a length (chunked) is read only up to the cap. Serve's HTTP proxy
queues every message of a body before the replica asks for it, so the replica's cap alone does not
bound the proxy's memory; :class:`BodyLimitMiddleware` applies the same cap inside the proxy, which
loads it at start from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=distpp.serve.http:proxy_middlewares``
(``init_local_ray`` sets it; on a cluster, export it before ``ray start`` on every node).

JSON: numbers are parsed with bounded digits, NaN/Infinity literals are refused (not JSON), deep
nesting is an error answer, never a crash: every malformed body is a 400 with
``{"error": message, "type": error class}``.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from ..errors import DistppError, InputError

# Two prompts of MAX_PROMPT_CHARS (4 bytes per character at most in UTF-8, 6 as JSON escapes) do not
# fit in 64 KiB only when both are long non-ASCII texts; 64 KiB keeps a refused body cheap.
MAX_BODY_BYTES = 64 * 1024
# A request's numbers are seeds (< 2**32: 10 digits), steps and scales. Longer integers are refused
# while parsing, below CPython's 4300-digit conversion limit (whose ValueError would be a 500); up to
# 1000 digits they reach the field checks, which name the field (lam = 10**400 overflows float32).
MAX_INT_DIGITS = 1000


class BodyTooLarge(InputError):
    """The request body is over the cap (HTTP 413)."""


class Overloaded(DistppError):
    """The replica's in-flight cost bound is reached (HTTP 503 with Retry-After)."""


class NonFiniteResult(InputError):
    """A request's settings overflowed inside the math: its result holds NaN/inf (HTTP 422)."""


def status_of(e: Exception) -> int:
    """The HTTP status of an error answer."""
    if isinstance(e, BodyTooLarge):
        return 413
    if isinstance(e, NonFiniteResult):
        return 422
    if isinstance(e, Overloaded):
        return 503
    if isinstance(e, DistppError):
        return 400
    return 500


def error_body(e: Exception) -> dict:
    return {"error": str(e), "type": type(e).__name__}


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length of ASGI ``headers`` (None when absent); InputError when it is not a number."""
    for k, v in headers:
        if k.lower() == b"content-length":
            if not v.strip().isdigit():
                raise InputError(f"Content-Length {v[:40]!r} is not a byte count")
            return int(v)
    return None


def too_large(size: int | None, limit: int) -> BodyTooLarge:
    got = "more than that" if size is None else f"{size} bytes"
    return BodyTooLarge(f"the request body is {got}; send at most {limit} bytes (a JSON request is well "
                        "under 1 KiB plus its prompts)")


async def read_body(length: int | None, chunks: AsyncIterator[bytes], limit: int = MAX_BODY_BYTES) -> bytes:
    """The body from an async iterator of chunks (starlette's ``Request.stream()``), refusing a
    Content-Length over ``limit`` before reading and stopping a longer body at ``limit``."""
    if length is not None and length > limit:
        raise too_large(length, limit)
    parts, n = [], 0
    async for chunk in chunks:
        n += len(chunk)
        if n > limit:
            raise too_large(length, limit)
        parts.append(chunk)
    return b"".join(parts)


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise InputError(f"a JSON integer with {len(digits.lstrip('-'))} digits; numbers in a request have "
                         f"at most {MAX_INT_DIGITS} digits")
    return int(digits)


def _no_constant(name: str):
    raise InputError(f"{name} is not valid JSON (no NaN/Infinity literals); send a finite number")


def parse_json(body: bytes) -> Any:
    """Strict JSON of a request body; InputError (400) for anything that is not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"the body is not valid JSON: not UTF-8 ({e}); send e.g. {{\"prompt\": \"a cat\"}}") from None
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"the body is not valid JSON ({e}); send e.g. {{\"prompt\": \"a cat\"}}") from None
    except RecursionError:
        raise InputError("the body is not valid JSON for a request: nested too deeply; send one flat object "
                         "like {\"prompt\": \"a cat\"}") from None


class BodyLimitMiddleware:
    """ASGI middleware for Serve's HTTP proxy: refuses HTTP bodies over ``max_bytes`` with a 413 JSON
    answer before the proxy queues them; the body it read (at most ``max_bytes``) is replayed to the
    app unchanged. Only ``http`` requests are touched."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            length = content_length(scope.get("headers", []))
            if length is not None and length > self.max_bytes:
                raise too_large(length, self.max_bytes)
            held, n = [], 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":  # disconnect: let the app see it
                    held.append(msg)
                    break
                n += len(msg.get("body", b""))
                if n > self.max_bytes:
                    raise too_large(length, self.max_bytes)
                held.append(msg)
                if not msg.get("more_body", False):
                    break
        except InputError as e:
            return await _send_json(send, status_of(e), error_body(e))

        async def replay():
            return held.pop(0) if held else await receive()

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def proxy_middlewares(max_bytes: int = MAX_BODY_BYTES) -> list:
    """The proxy's middleware list (``http_options["middlewares"]``): the body limit."""
    from starlette.middleware import Middleware

    return [Middleware(BodyLimitMiddleware, max_bytes=max_bytes)]


# Serve's proxy imports and calls this (no arguments) at start when the variable names it; HTTPOptions
# no longer takes middlewares (Ray 2.60 refuses the field).
PROXY_CALLBACK_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "distpp.serve.http:proxy_middlewares"}
