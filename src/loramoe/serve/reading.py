"""Reading a request off the wire, bounded: its body's size and JSON nesting, and text that is valid Unicode.

Design decisions:

- The body is read up to ``max_body_bytes`` (413 beyond it, checked while reading, not after) within
  ``read_timeout`` seconds (408 past it), so a client sending one byte now and then cannot hold a request open.
- JSON is parsed without NaN or Infinity, then walked once, iteratively, so that nesting deeper than
  ``MAX_DEPTH`` (no request needs more than four levels) and strings that are not valid Unicode (a lone surrogate
  such as ``"\\ud800"``, which no tokenizer can take) are 400s naming where they are, before any other code sees the
  value. A body nested so deep that the parser itself gives up (Python's recursion limit) is the same 400.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from loramoe.files import MAX_DEPTH
from loramoe.serve.protocol import APIError
from loramoe.strict_json import JSONRefused, StrictDecoder


async def read_json(request: Request, limit: int, timeout: float) -> Any:
    """The body as JSON, read up to ``limit`` bytes within ``timeout`` seconds (413 beyond the size, 408 past the
    time, 400 for anything that is not JSON or a client that left before the end of its body)."""
    try:
        body = await asyncio.wait_for(_read(request, limit), timeout)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
        raise APIError(
            408, f"the request body did not arrive within {timeout:g} s", code="request_timeout"
        ) from None
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection before the end of its body") from None
    return parse_json(body)


async def _read(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    # ASCII digits only (str.isdigit() takes "²", which int() refuses); more than 18 is past any limit
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """``body`` parsed and checked (depth, Unicode).

    Raises:
        APIError: 400 saying what is wrong and where.
    """
    try:
        # as json.loads reads bytes (UTF-8, or UTF-16/32 by their BOM), through the decoder every user JSON goes
        # through: a key given twice (json keeps the last) and an integer too long to convert are refused
        value = StrictDecoder().decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except JSONRefused as err:
        where = "the body" if err.field is None else f"{err.field!r}"
        raise APIError(400, f"{where}: {err.problem}", param=err.field) from None
    except json.JSONDecodeError as err:
        raise APIError(
            400, f"the body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise APIError(400, f"the body is nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise APIError(400, f"the body is nested deeper than {MAX_DEPTH} levels (at {_where(path)})")
        if isinstance(node, str):
            _check_text(node, path)
        elif isinstance(node, dict):
            for key, item in node.items():
                _check_text(key, path + (key,))
                stack.append((item, path + (key,)))
        elif isinstance(node, list):
            stack.extend((item, path + (index,)) for index, item in enumerate(node))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise APIError(
            400,
            f"{_where(path)}: the text holds a lone surrogate ({ascii(bad)[1:-1]}), which is not valid Unicode; "
            "send UTF-8 text",
            param=_safe(path[0]) if path else None,
        ) from None


def _where(path: tuple) -> str:
    return ".".join(map(_safe, path)) or "the body"


def _safe(part: Any) -> str:
    """A path part that an error body can hold (a key may be the very text that is not valid Unicode)."""
    return str(part).encode("utf-8", "backslashreplace").decode("utf-8")
