"""Stage programs (``.pt2``) read as data: checked member by member before torch sees them.

``torch.export.load`` (torch 2.14) runs code from an archive in several places: it
unpickles the sample inputs (``torch.load``, falling back to ``weights_only=False``),
any weight or constant its config marks ``use_pickle`` (``weights_only=False``, or plain
``pickle.loads``), legacy ``data/weights/model.pt`` files; it loads AOTInductor shared
libraries; it hands each shape expression of the graph to ``sympy.sympify`` (``eval``);
and ``.module()`` execs the program's ``guards_code``. A graph node may also name
any callable under ``torch``.

:func:`load_program` therefore reads the archive with Python's :mod:`zipfile` first and
refuses, in one line naming the file and the member, anything but what
:mod:`cascade.deploy.export` writes: the fixed metadata members, the graph JSON, the two payload
configs and raw tensor records (never pickles), an EMPTY sample-inputs record, no guard
code, graph nodes that call ATen operators (none that touches files) or the few Python
operators symbolic shapes use, and shape expressions built only from sympy's
constructors. Only then does torch load the same bytes, from memory.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tokenize
import zipfile
from functools import cache
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from cascade.core.errors import CascadeError, described

#: the members of a program archive, below its root folder, that are not tensor records
_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
          "models/model.json", "data/weights/model_weights_config.json",
          "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}
_REQUIRED = {"archive_format", "archive_version", "models/model.json", "data/weights/model_weights_config.json",
             "data/constants/model_constants_config.json"}
_RECORD = {"weights": re.compile(r"weight_\d+"), "constants": re.compile(r"tensor_\d+")}
_ROOT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_FQN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
#: Python operators symbolic-shape nodes call (serialized as ``_operator.NAME``)
_OPERATORS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le",
              "gt", "ge", "and_", "or_", "not_"}
_SYM_FUNCTIONS = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"}
#: names a shape expression may use: sympy's constructors and torch's sympy functions
_EXPR_NAMES = {"Symbol", "Integer", "Float", "Rational", "positive", "integer", "real", "nonnegative", "finite",
               "True", "False", "oo", "zoo", "nan", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And",
               "Or", "Not", "Mod", "sqrt", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
               "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator",
               "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatTrueDiv", "IntTrueDiv",
               "FloatPow", "PowByNatural", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or"}
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")
_EXPR_OPS = {"(", ")", ",", "+", "-", "*", "/", "//", "**", "%", "=", "==", "!=", "<", "<=", ">", ">=", "&", "|",
             "~"}
_TORCH_LOGGERS = ("torch.export", "torch._export.serde.serialize")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _TensorMeta(_Strict):
    sizes: list[dict[Literal["as_int"], Annotated[int, Field(ge=0)]]]


class _Payload(_Strict):
    path_name: str
    is_param: bool
    use_pickle: Literal[False]
    tensor_meta: _TensorMeta


class _PayloadConfig(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)
    config: dict[str, _Payload]


def load_program(label: str, data: bytes) -> nn.Module:
    """A stage program from the bytes of its ``.pt2`` file, checked first (see the module
    docstring).

    Args:
        label: how errors name the file (its path).
        data: the file's bytes (already hash-checked by the caller: torch loads exactly these).

    Raises:
        CascadeError: one line naming the file and the member torch would have run or that
            is not a torch.export program.
    """
    check_archive(label, data)
    loggers = [logging.getLogger(n) for n in _TORCH_LOGGERS]
    before = [lg.disabled for lg in loggers]
    try:
        for lg in loggers:  # torch logs a traceback before re-raising some errors: the one line below says it
            lg.disabled = True
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as exc:  # noqa: BLE001  (torch raises many types for an archive it cannot read)
        raise CascadeError(f"{label}: not a torch.export program ({described(exc)})") from None
    finally:
        for lg, b in zip(loggers, before):
            lg.disabled = b


def check_archive(label: str, data: bytes) -> None:
    """Refuse an archive holding anything torch.export.load would execute or unpickle.

    Raises:
        CascadeError: one line naming ``label`` and the offending member.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CascadeError(f"{label}: not a torch.export program (not a .pt2 archive: {exc})") from None
    if not infos:
        raise CascadeError(f"{label}: not a torch.export program (an empty archive)")
    names = [i.filename for i in infos]
    root = names[0].split("/", 1)[0]
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if (not _ROOT.fullmatch(root) or len(parts) < 2 or parts[0] != root or "\\" in name
                or any(p in ("..", ".") for p in parts)):
            raise CascadeError(f"{label}: member {name!r}: outside the archive's root folder {root!r}")
        rel = name[len(root) + 1:]
        if rel in members:
            raise CascadeError(f"{label}: member {name}: appears twice")
        if info.compress_type != zipfile.ZIP_STORED:  # torch stores; compression could hide a zip bomb
            raise CascadeError(f"{label}: member {name}: compressed; torch.export writes stored members")
        if not _allowed(rel):
            raise CascadeError(f"{label}: member {name}: not part of a program `cascade export` writes "
                               "(this cascade loads no pickles, extra files or compiled code)")
        members[rel] = info
    missing = sorted(_REQUIRED - members.keys())
    if missing:
        raise CascadeError(f"{label}: not a torch.export program (no member {root}/{missing[0]})")
    sample = members.get("data/sample_inputs/model.pt")
    if sample is not None and sample.file_size:
        raise CascadeError(f"{label}: member {sample.filename}: holds pickled sample inputs; a bundle's programs "
                           "carry none (export the run again with this cascade)")
    for kind in ("weights", "constants"):
        _check_payloads(label, archive, members, root, kind)
    _check_graph(label, f"{root}/models/model.json", _read_json(label, archive, f"{root}/models/model.json"))


def _allowed(rel: str) -> bool:
    if rel in _FIXED:
        return True
    folder, _, name = rel.rpartition("/")
    return any(folder == f"data/{kind}" and pattern.fullmatch(name) for kind, pattern in _RECORD.items())


def _read_json(label: str, archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(archive.read(name), parse_constant=lambda c: c)
    except (ValueError, UnicodeDecodeError, RecursionError, zipfile.BadZipFile, OSError) as exc:
        raise CascadeError(f"{label}: member {name}: not valid JSON ({str(exc).splitlines()[0]})") from None


def _check_payloads(label: str, archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], root: str,
                    kind: str) -> None:
    """Every weight or constant is a raw tensor record of the archive, never a pickle."""
    name = f"{root}/data/{kind}/model_{kind}_config.json"
    try:
        config = _PayloadConfig.model_validate(_read_json(label, archive, name))
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in e["loc"])
        hint = " (a pickled tensor or object)" if e["loc"][-1:] == ("use_pickle",) else ""
        raise CascadeError(f"{label}: member {name}: {where}: {e['msg']}{hint}") from None
    for fqn, payload in config.config.items():
        if not _FQN.fullmatch(fqn) or "__" in fqn:
            raise CascadeError(f"{label}: member {name}: {fqn!r} is not a parameter name")
        rel = f"data/{kind}/{payload.path_name}"
        if not _RECORD[kind].fullmatch(payload.path_name) or rel not in members:
            raise CascadeError(f"{label}: member {name}: {fqn}: record {payload.path_name!r} is not a "
                               f"{kind} record of the archive")
        numel = 1
        for s in payload.tensor_meta.sizes:
            numel *= s["as_int"]
        if numel and not members[rel].file_size:  # torch would allocate the claimed size from nothing
            raise CascadeError(f"{label}: member {root}/{rel}: empty, but {fqn} claims {numel} values")


def _check_graph(label: str, name: str, graph: Any) -> None:
    if not isinstance(graph, dict):
        raise CascadeError(f"{label}: member {name}: not a serialized program")
    if graph.get("guards_code"):
        raise CascadeError(f"{label}: member {name}: guards_code: holds Python code (torch would exec it); a "
                           "bundle's programs carry none")
    for key in graph.get("range_constraints") or {}:
        if not _SYMBOL.fullmatch(str(key)):
            raise CascadeError(f"{label}: member {name}: range_constraints: {str(key)[:40]!r} is not a symbol name")
    stack: list[tuple[str, Any]] = [("", graph)]
    while stack:  # every dict and list of the document, without recursion
        path, value = stack.pop()
        if isinstance(value, dict):
            target = value.get("target")
            if isinstance(target, str) and not _allowed_target(target):
                raise CascadeError(f"{label}: member {name}: {path}target: {target[:80]!r} is not an ATen "
                                   "operator a bundle may call")
            expr = value.get("expr_str")
            if expr is not None and not _safe_expression(expr):
                raise CascadeError(f"{label}: member {name}: {path}expr_str: {str(expr)[:80]!r} is not a shape "
                                   "expression (torch would eval it)")
            stack.extend((f"{path}{k}.", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}{i}.", v) for i, v in enumerate(value))


def _allowed_target(target: str) -> bool:
    parts = target.split(".")
    if parts[0] == "_operator":
        return len(parts) == 2 and parts[1] in _OPERATORS
    if len(parts) == 2 and parts[0] == "torch":
        return parts[1] in _SYM_FUNCTIONS
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"]:
        return False
    return parts[3] not in _unsafe_aten_ops()


@cache
def _unsafe_aten_ops() -> frozenset[str]:
    """ATen operators that touch the world outside their tensors: files, printing."""
    unsafe = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("aten::") and (
                any(a.name == "filename" for a in schema.arguments)
                or schema.name in ("aten::_print", "aten::save")):
            unsafe.add(schema.name.removeprefix("aten::"))
    return frozenset(unsafe)


def _safe_expression(expr: Any) -> bool:
    """A sympy expression string built from numbers, symbols and sympy's constructors
    only: no attribute access, no subscripts, no other names (``sympify`` evals it)."""
    if not isinstance(expr, str) or len(expr) > 2000:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            continue
        if tok.type == tokenize.NAME:
            if tok.string not in _EXPR_NAMES and not _SYMBOL.fullmatch(tok.string):
                return False
        elif tok.type == tokenize.STRING:
            if not re.fullmatch(r"'[a-z]{1,4}\d+'", tok.string):
                return False
        elif tok.type != tokenize.OP or tok.string not in _EXPR_OPS:
            return False
    return True
