"""Reading and decoding a ``POST /predict`` body, within limits a client cannot get around.

The body is read as a stream and counted: past ``max_bytes`` (or a ``Content-Length``
that says so) the request is refused with a 413 before anything is parsed. Decoding is
plain Python / numpy work the caller runs off the event loop. JSON: its nesting depth and
its number of inputs are read from the bytes first (numpy, which releases the GIL), so a
body too deep or with too many inputs is refused before the parser (which holds the GIL)
runs; then ``json.loads`` and numpy check that it is numbers only. (A pydantic model of
nested numbers was 10x slower than ``json.loads`` on a 4096-input body; the OpenAPI
models in :mod:`cascade.serve.schema` state the same contract.) ``.npy``: numpy's header
reader with a header size cap, the claimed shape checked against the body's length and
the inputs limit before anything is allocated.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
from fastapi import Request
from numpy.lib import format as npy_format

#: Content-Type of a ``numpy.save`` body
NPY_CONTENT_TYPE = "application/x-npy"
JSON_TYPES = ("application/json", "text/json")
NPY_TYPES = (NPY_CONTENT_TYPE, "application/octet-stream")
#: the largest ``.npy`` header accepted (numpy's own default cap)
NPY_MAX_HEADER = 10_000
#: raw input values beyond this size are refused (the schema says so too): a float32
#: network cannot give a meaningful answer to them
MAX_ABS_INPUT = 1e30

class Problem(Exception):
    """A request the server refuses: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(one_line(message))
        self.status = status


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def check_content_type(ctype: str) -> None:
    """Raises: Problem: 415, a content type the server does not decode."""
    if ctype not in JSON_TYPES + NPY_TYPES:
        raise Problem(415, f"content type {ctype[:60]!r}: send application/json or {NPY_CONTENT_TYPE} "
                           "(the bytes of numpy.save)")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, read as a stream and refused past ``max_bytes``.

    Raises:
        Problem: 413, a ``Content-Length`` or a body over the limit (nothing more is read);
            400, a ``Content-Length`` that is not a number.
    """
    limit = f"send at most {max_bytes / 2 ** 20:.3g} MB (--max-body-mb)"
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise Problem(400, f"Content-Length {declared[:40]!r}: not a number") from None
        if length > max_bytes:
            raise Problem(413, f"body of {length} bytes: {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise Problem(413, f"body over {max_bytes} bytes: {limit}")
    return bytes(body)


def decode(body: bytes, ctype: str, max_inputs: int, *, batch_only: bool = False) -> np.ndarray:
    """A body's raw inputs (one input comes as a batch of one; shapes are the bundle's to
    check). Pure CPU work: run it off the event loop. ``batch_only``: JSON must be
    ``{"inputs": [...]}`` (the oracle protocol).

    Raises:
        Problem: 415 an unknown content type; 400 a body that is not JSON / ``.npy``, or
            lacks ``input`` / ``inputs``; 422 too many inputs (the schema's maxItems), values that are not a
            rectangular array of numbers, or are too large.
    """
    check_content_type(ctype)
    raw = _decode_npy(body, max_inputs) if ctype in NPY_TYPES else _decode_json(body, batch_only, max_inputs)
    if raw.ndim >= 1 and len(raw) > max_inputs:
        raise Problem(422, f"{len(raw)} inputs in one request: send at most {max_inputs}")
    if raw.dtype.kind in "iuf" and raw.size and float(np.abs(raw).max(initial=0)) > MAX_ABS_INPUT:
        raise Problem(422, f"inputs: values beyond ±{MAX_ABS_INPUT:g}")
    return raw


#: JSON nesting beyond this is refused before parsing (a batch of the deepest inputs the
#: schema allows is far shallower)
MAX_JSON_DEPTH = 32
#: JSON bodies over this size are scanned for depth and inputs before they are parsed
SCAN_BYTES = 16 * 1024
#: JSON tokens that are never a number; in a valid body they cannot be inside a string
#: either (its only strings are the keys "input" / "inputs")
_NOT_NUMBERS = (b"true", b"false", b"null")


def _json_shape(body: bytes) -> tuple[int, int]:
    """(deepest nesting, items of the arrays at depth 2) read from the bytes: a valid body
    has no brackets or commas inside strings."""
    b = np.frombuffer(body, np.uint8)
    step = ((b == ord("[")) | (b == ord("{"))).view(np.int8) - ((b == ord("]")) | (b == ord("}"))).view(np.int8)
    depth = np.cumsum(step, dtype=np.int32)
    items = int(np.count_nonzero((depth == 2) & (b == ord(",")))) + 1
    return int(depth.max(initial=0)), items


def _decode_json(body: bytes, batch_only: bool, max_inputs: int) -> np.ndarray:
    if len(body) > SCAN_BYTES:  # a small body is parsed at once (the parser's own depth check is enough)
        deepest, items = _json_shape(body)
        if deepest > MAX_JSON_DEPTH:
            raise Problem(400, f"body: JSON nested {deepest} deep; inputs are nested lists at most {MAX_JSON_DEPTH} "
                               "deep")
        if b'"inputs"' in body and items > max_inputs:
            raise Problem(422, f"{items} inputs in one request: send at most {max_inputs}")
    try:
        data = json.loads(body)
    except RecursionError:
        raise Problem(400, f"body: JSON nested too deep; inputs are nested lists at most {MAX_JSON_DEPTH} "
                           "deep") from None
    except ValueError as exc:  # JSONDecodeError, bytes that are not UTF-8, a huge integer
        raise Problem(400, f"body: not valid JSON ({exc})") from None
    keys = set(data) if isinstance(data, dict) else None
    if batch_only and keys != {"inputs"}:
        raise Problem(400, 'body: give {"inputs": [[...], ...]} (a batch: the oracle protocol)')
    if keys not in ({"input"}, {"inputs"}):
        unknown = sorted(keys - {"input", "inputs"}) if keys else []
        raise Problem(400, 'body: give {"input": [...]} (one input) or {"inputs": [[...], ...]} (a batch)'
                           f"{f'; unknown key {unknown[0][:40]!r}' if unknown else ''}")
    if any(token in body for token in _NOT_NUMBERS):
        raise Problem(422, "inputs: not a numeric array (true, false and null are not numbers)")
    values = [data["input"]] if "input" in data else data["inputs"]
    try:
        raw = np.asarray(values)
        # integers beyond int64 make an object array: as floats they are numbers like the others
        raw = np.asarray(values, dtype=np.float64) if raw.dtype == object else raw
    except (ValueError, TypeError):  # ragged nested lists, or dicts in them
        raise Problem(422, "inputs: not a rectangular array of numbers (nested lists of different lengths)") from None
    if raw.dtype.kind not in "iuf":
        raise Problem(422, "inputs: not a numeric array (nested lists of JSON numbers; strings are not numbers)")
    return raw


def _decode_npy(body: bytes, max_inputs: int) -> np.ndarray:
    """A ``numpy.save`` array, its header checked before anything is allocated."""
    f = io.BytesIO(body)
    try:
        version = npy_format.read_magic(f)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=NPY_MAX_HEADER)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        why = one_line(str(exc)).split(". ")[0]  # numpy's header-size refusal goes on for three sentences
        raise Problem(400, f"body: not a .npy array written by numpy.save ({why}; headers up to "
                           f"{NPY_MAX_HEADER} bytes)") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise Problem(422, f"inputs: dtype {dtype} is not a real number type")
    if shape and shape[0] > max_inputs:
        raise Problem(422, f"{shape[0]} inputs in one request: send at most {max_inputs}")
    count = math.prod(shape)  # Python ints: no overflow
    data = len(body) - f.tell()
    if count * dtype.itemsize != data:
        raise Problem(400, f"body: the .npy header claims shape {list(shape)} of {dtype} ({count * dtype.itemsize} "
                           f"bytes) but {data} bytes follow it")
    raw = np.frombuffer(body, dtype=dtype, count=count, offset=f.tell()).reshape(shape, order="F" if fortran else "C")
    return raw if dtype.isnative else raw.astype(dtype.newbyteorder("="))  # torch takes native byte order only
