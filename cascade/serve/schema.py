"""The HTTP contract of ``cascade serve`` and ``cascade serve-oracle``: pydantic models for
every request and response, so that ``/openapi.json`` (and ``/docs``) state it.

The request models are built per bundle (its input shape is in the schema); the server
itself reads the body as a stream within its limits (:mod:`cascade.serve.body`) and
accepts exactly what these schemas describe.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, conlist, create_model

from cascade.serve.body import MAX_ABS_INPUT, NPY_CONTENT_TYPE
from cascade.serve.oracle import BreakerState

Number = Annotated[float, Field(ge=-MAX_ABS_INPUT, le=MAX_ABS_INPUT)]


class ErrorDetail(BaseModel):
    """A refused request: one line saying why."""

    detail: str = Field(description="one line: what was wrong and what to send instead")


class Prediction(BaseModel):
    """The answer to one input."""

    prediction: Union[str, list[float]] = Field(
        description="classification: the class name; regression: the output values")
    stage: int = Field(ge=0, description="the stage that answered (the last index: the last stage / oracle)")
    score: Union[float, None] = Field(description="the last routed stage's score (higher: keep it there)")
    mflops: float = Field(ge=0, description="the input's cost in MFLOPs (the last stage's counted when it answered)")
    fallback: bool = Field(description="appealed, but the oracle could not be reached: the last routed stage's "
                                       "answer stands")


class PredictResponse(BaseModel):
    """``POST /predict``'s answer: one prediction per input, in order."""

    predictions: list[Prediction]


class OracleState(BaseModel):
    url: str
    breaker: BreakerState


class ServeHealth(BaseModel):
    """``GET /health`` of ``cascade serve``."""

    status: Literal["ok"]
    bundle: str
    path: str
    stages: int
    white_box: bool = Field(description="the bundle holds its last stage (the big network)")
    input_shape: list[int]
    oracle: Union[OracleState, None] = Field(description="the remote oracle and its circuit breaker, if any")


class OracleHealth(BaseModel):
    """``GET /health`` of ``cascade serve-oracle``."""

    status: Literal["ok"]
    bundle: str
    path: str
    role: Literal["oracle"]
    input_shape: list[int]
    outputs: int


def _array(shape: tuple[int, ...]) -> Any:
    """Nested lists of exactly ``shape`` numbers."""
    t: Any = Number
    for n in reversed(shape):
        t = conlist(t, min_length=n, max_length=n)
    return t


def _one_input(shape: tuple[int, ...]) -> Any:
    # grey images may leave out their channel axis, as the server accepts them
    return Union[_array(shape), _array(shape[1:])] if len(shape) > 1 and shape[0] == 1 else _array(shape)


def _batch(shape: tuple[int, ...], max_inputs: int) -> Any:
    def rows(s: tuple[int, ...]) -> Any:
        return conlist(_array(s), min_length=1, max_length=max_inputs)

    return Union[rows(shape), rows(shape[1:])] if len(shape) > 1 and shape[0] == 1 else rows(shape)


def _zeros(shape: tuple[int, ...]) -> Any:
    return 0 if not shape else [_zeros(shape[1:]) for _ in range(shape[0])]


def request_models(input_shape: tuple[int, ...], max_inputs: int, name: str = "Predict") -> tuple[type, type]:
    """The two JSON bodies for a bundle: ``{"input": one}`` and ``{"inputs": [batch]}``."""
    shape, forbid = tuple(input_shape), ConfigDict(extra="forbid")
    dims = ", ".join(map(str, shape))
    one = create_model(
        f"{name}One", __config__=forbid,
        input=(_one_input(shape), Field(description=f"one raw input of shape [{dims}]",
                                        examples=[_zeros(shape)])))
    many = create_model(
        f"{name}Batch", __config__=forbid,
        inputs=(_batch(shape, max_inputs), Field(description=f"a batch of raw inputs [B, {dims}], 1 <= B <= "
                                                 f"{max_inputs}", examples=[[_zeros(shape)]])))
    return one, many


def request_body(input_shape: tuple[int, ...], max_inputs: int, *, npy: bool = True, batch_only: bool = False,
                 name: str = "Predict") -> dict:
    """The OpenAPI ``requestBody`` of a ``POST /predict`` (for ``openapi_extra``): the JSON
    forms, and the bytes of ``numpy.save``."""
    one, many = request_models(input_shape, max_inputs, name)
    schemas = [many.model_json_schema()] if batch_only else [one.model_json_schema(), many.model_json_schema()]
    dims = ", ".join(map(str, input_shape))
    content: dict[str, Any] = {"application/json": {"schema": schemas[0] if batch_only else {"anyOf": schemas}}}
    if npy:
        content[NPY_CONTENT_TYPE] = {"schema": {
            "type": "string", "format": "binary",
            "description": f"the bytes of numpy.save of an array [B, {dims}] or [{dims}] (no pickles)"}}
    return {"requestBody": {"required": True, "content": content,
                            "description": f"raw inputs of shape [{dims}], as `cascade route` takes them; "
                                           f"values within ±{MAX_ABS_INPUT:g}"}}


def error_responses(*statuses: int) -> dict:
    """``responses=`` for FastAPI: each status with the :class:`ErrorDetail` model."""
    why = {400: "the body is not JSON / .npy, or lacks `input` / `inputs`",
           401: "no bearer token, or a wrong one",
           413: "the body is over the byte limit (--max-body-mb); nothing of it was parsed",
           415: "a content type other than application/json or application/x-npy",
           422: "not the bundle's input shape, not finite numbers, or more inputs than the limit",
           503: "routing or the network failed (the reason, in one line)"}
    return {s: {"model": ErrorDetail, "description": why[s]} for s in statuses}


OUTPUTS_DOC = "the big network's raw outputs [B, D] (logits / values), one row per input"


def oracle_response_model(outputs: int) -> type:
    return create_model("OracleOutputs", outputs=(list[conlist(float, min_length=outputs, max_length=outputs)],
                                                  Field(description=OUTPUTS_DOC)))
