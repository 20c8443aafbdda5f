"""The bundle manifest (``manifest.json``): one pydantic schema, checked on load.

:func:`read_manifest` refuses, in one line naming the key path, anything
:class:`cascade.deploy.bundle.Bundle` could not route correctly: a stage file that is not a
plain name in the bundle folder (checked before any file is opened, so a manifest
cannot probe the filesystem), a threshold outside the score range, a cost that is
not a number, preprocessing that would divide by zero, a kind that is not a
:class:`~cascade.core.enums.TaskKind`. Values are strict: ``"0.5"`` is not a number.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cascade.core.errors import CascadeError
from cascade.core.enums import Mode, TaskKind

#: the manifest's file name in a bundle folder
MANIFEST = "manifest.json"
#: the manifest format this code writes and reads. 2: SHA-256 of every file; programs
#: without pickled sample inputs or guard code.
FORMAT_VERSION = 2
#: a manifest larger than this is not one ``cascade export`` wrote
MAX_MANIFEST_BYTES = 1 << 20
#: the most values one input may have (a 1 GiB float32 zero input is what load would run)
MAX_INPUT_VALUES = 1 << 28

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: a stage answers where its score is at least this; scores lie in [0, 1]
Threshold = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _plain_name(value: str | None) -> str | None:
    """A file name inside the bundle folder: no folder part, no ``..``, not absolute."""
    if value is not None and (not _PLAIN_NAME.fullmatch(value) or value in (".", "..")):
        raise ValueError(f"{value!r} is not a plain file name inside the bundle folder")
    return value


def _sha256(value: str | None) -> str | None:
    if value is not None and not _SHA256.fullmatch(value):
        raise ValueError("not a SHA-256 (64 lowercase hex digits)")
    return value


class InputSpec(_Strict):
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=8)
    dtype: Literal["float32"]


class PreprocessingSpec(_Strict):
    """``x / raw_max``, then ``(x - mean) / std`` (one value, or one per channel)."""

    raw_max: Positive
    mean: list[Finite] = Field(min_length=1)
    std: list[Positive] = Field(min_length=1)


class StageSpec(_Strict):
    index: Annotated[int, Field(ge=0)]
    role: Literal["routed", "big", "oracle"]
    file: str | None
    sha256: str | None = None
    mflops: NonNegative | None
    params: Annotated[int, Field(ge=0)] | None = None
    onnx: str | None = None
    onnx_sha256: str | None = None
    onnx_error: str | None = None

    @field_validator("file", "onnx")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        return _plain_name(value)

    @field_validator("sha256", "onnx_sha256")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        return _sha256(value)

    @model_validator(mode="after")
    def _files_have_hashes(self) -> StageSpec:
        if self.role == "oracle":
            if self.file is not None or self.onnx is not None:
                raise ValueError("an oracle stage is outside the bundle: file must be null")
        elif self.file is None:
            raise ValueError(f"a {self.role} stage needs its file")
        if (self.file is None) != (self.sha256 is None):
            raise ValueError("sha256 must be given exactly when file is")
        if (self.onnx is None) != (self.onnx_sha256 is None):
            raise ValueError("onnx_sha256 must be given exactly when onnx is")
        return self


class OperatingPoint(_Strict):
    method: str
    mode: Mode
    variant: str | None
    seed: int | None
    target_ad: Finite | None  # None: a point chosen at an appeal budget
    appeal_budget: Finite | None = None
    threshold_source: str
    delta: Finite | None
    feasible: bool
    expected: dict[str, Finite | None]


class RunInfo(_Strict):
    path: str
    config: str | None
    config_sha256: str


class Versions(_Strict):
    cascade: str | None
    torch: str


class Manifest(_Strict):
    """What ``cascade export`` writes into ``manifest.json``."""

    format_version: Literal[2]
    task: str
    kind: TaskKind
    input: InputSpec
    preprocessing: PreprocessingSpec | None
    output_names: list[str] = Field(min_length=1)
    stages: list[StageSpec] = Field(min_length=2)
    #: [K-1] stage k answers where its score >= thresholds[k]; null: no input stops there
    thresholds: list[Threshold | None]
    operating_point: OperatingPoint
    run: RunInfo
    versions: Versions

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for k, s in enumerate(self.stages):
            if s.index != k:
                raise ValueError(f"stages.{k}.index is {s.index}; stages are listed in order from 0")
            if k < len(self.stages) - 1 and (s.role != "routed" or s.mflops is None):
                raise ValueError(f"stages.{k}: every stage before the last is a routed stage with its mflops")
        if self.stages[-1].role == "routed":
            raise ValueError(f"stages.{len(self.stages) - 1}: the last stage is the big network or an oracle")
        if len(self.thresholds) != len(self.stages) - 1:
            raise ValueError(f"thresholds: {len(self.thresholds)} given for {len(self.stages) - 1} routed stage(s)")
        if len(set(self.output_names)) != len(self.output_names):
            raise ValueError("output_names: names repeat")
        values = math.prod(self.input.shape)
        if values > MAX_INPUT_VALUES:
            raise ValueError(f"input.shape: {values:,} values per input, more than {MAX_INPUT_VALUES:,}")
        channels = self.input.shape[0]
        if self.preprocessing is not None:
            for key in ("mean", "std"):
                n = len(getattr(self.preprocessing, key))
                if n not in (1, channels):
                    raise ValueError(f"preprocessing.{key}: {n} values for {channels} channel(s); give 1 or "
                                     f"{channels}")
        return self

    def files(self) -> list[tuple[str, str, str]]:
        """``(key path, file name, sha256)`` for every file the manifest lists."""
        out = []
        for k, s in enumerate(self.stages):
            if s.file is not None:
                out.append((f"stages.{k}.file", s.file, s.sha256))
            if s.onnx is not None:
                out.append((f"stages.{k}.onnx", s.onnx, s.onnx_sha256))
        return out


def read_manifest(path: Path) -> tuple[Manifest, dict[str, Any]]:
    """Read and validate a bundle's ``manifest.json``.

    Returns:
        The validated manifest and the same document as a plain dict.

    Raises:
        CascadeError: one line naming the file and the first bad key path (with how many
            more there are); a manifest of another format version says to export again.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise CascadeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CascadeError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest `cascade export` "
                           "wrote")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CascadeError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CascadeError(f"{path}: not a manifest (a JSON {type(data).__name__}, not an object)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CascadeError(f"{path}: format_version {version!r}; this cascade reads version {FORMAT_VERSION} "
                           "(export the run again with this version)")
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise CascadeError(f"{path}: {_errors_line(exc)}") from None
    return manifest, data


def parse_manifest(data: dict[str, Any], label: str = "manifest") -> Manifest:
    """Validate a manifest given as a dict (a bundle built in code, not read from a file).

    Raises:
        CascadeError: one line naming ``label`` and the first bad key path.
    """
    try:
        return Manifest.model_validate_json(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as exc:  # NaN, or a value JSON cannot hold
        if isinstance(exc, ValidationError):
            raise CascadeError(f"{label}: {_errors_line(exc)}") from None
        raise CascadeError(f"{label}: not a JSON document ({exc})") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _errors_line(exc: ValidationError, shown: int = 3) -> str:
    """The first few problems, each ``key.path: message``, on one line."""
    errors = exc.errors(include_url=False)
    parts = []
    for e in errors[:shown]:
        where = "".join(f"{p}: " if i == len(e["loc"]) - 1 else f"{p}." for i, p in enumerate(e["loc"]))
        message = e["msg"].removeprefix("Value error, ")
        if "input" in e and e["type"] not in ("missing", "extra_forbidden"):
            message += f" (got {_short(e['input'])})"
        parts.append(f"{where}{message}")
    more = f" (and {len(errors) - shown} more problem(s))" if len(errors) > shown else ""
    return ("; ".join(parts) + more).replace("\n", " ")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, BaseModel) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."
