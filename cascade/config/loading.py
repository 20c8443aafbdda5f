"""Reading a config: YAML (plain data, no key twice), ``--set key=value`` overrides and
the config's own ``quick:`` overrides, then :func:`~cascade.config.validation.validate`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from cascade.config.limits import check_file_size, check_value_count
from cascade.config.schema import ExperimentConfig
from cascade.config.validation import validate
from cascade.core.errors import CascadeError, ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the
    last silently, so a repeated ``pretrain:`` block would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping; errors name the file (and the line, for malformed YAML).

    Raises:
        CascadeError: missing or unreadable file, one too big (before it is read) or holding
            too many values (:mod:`cascade.config.limits`), malformed YAML
            (with its line), a key given twice, or a document that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CascadeError(f"{path}: config file not found")
    check_file_size(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CascadeError(f"{path}: cannot read the config ({exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only, like safe_load
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CascadeError(f"{path}: {where}malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise CascadeError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    check_value_count(path, data)
    return data


def apply_override(data: dict[str, Any], assignment: str, source: str = "--set") -> None:
    """Apply ``a.b.c=value`` to nested ``data`` in place; ``value`` is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise CascadeError(f"{source} {assignment!r}: expected key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise CascadeError(f"{source} {assignment!r}: value is not valid YAML") from None
    set_path(data, key, value, source)


def set_path(data: dict[str, Any], key: str, value: Any, source: str = "--set") -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way; a
    number indexes a list (``methods.0.alphas``)."""
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise CascadeError(f"{source} {key}: {part!r} is not an index of the list at "
                                   f"{'.'.join(parts[:i]) or '<root>'} ({len(node)} items)")
            if last:
                node[int(part)] = value
                return
            child = node[int(part)]
            if isinstance(child, str):  # a method given by name alone: {name: ...} takes options
                child = node[int(part)] = {"name": child}
            node = child
            continue
        if not isinstance(node, dict):
            raise CascadeError(f"{source} {key}: {parts[i - 1]!r} is not a mapping")
        if last:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child


def load_config(
    path: str | Path, overrides: list[str] = (), quick: bool = False, resolve_data: bool = False
) -> ExperimentConfig:
    """Read, override and validate a config file, as it runs and as ``--quick`` runs it.

    Both are validated whichever is asked for, and their errors reported together (those
    of the ``--quick`` form only marked so): ``cascade validate`` then vouches for
    ``run --quick`` too, and a value that a ``quick:`` override replaces must still be
    valid for the full run.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings, applied in order after the file (and after the
            ``quick:`` overrides); an error in a key they set says so.
        quick: return the config with its ``quick:`` overrides applied (a few steps, for tests).
        resolve_data: see :func:`validate`.

    Raises:
        CascadeError: unreadable or malformed file, bad override.
        ConfigError: the config (with overrides), or its ``--quick`` form, fails validation.
    """
    data = read_yaml(path)
    full = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(full, assignment)
    cfg, errors = _validated(full, path, overrides, resolve_data)
    q = data.get("quick")
    if isinstance(q, dict) and q:  # not a mapping: the schema says so
        fast = copy.deepcopy(data)
        quick_errors: list[str] = []
        for key, value in q.items():
            try:
                set_path(fast, str(key), copy.deepcopy(value), "quick:")
            except CascadeError as exc:
                quick_errors.append(str(exc))
        for assignment in overrides:
            apply_override(fast, assignment)
        quick_cfg, more = _validated(fast, path, overrides, resolve_data) if not quick_errors else (None, [])
        errors += [f"{e} (with --quick{_quick_blame(e, q)})" for e in quick_errors + more if e not in errors]
        if quick:
            cfg = quick_cfg
    if errors:
        raise ConfigError(str(path), errors)
    assert cfg is not None  # no error means a config
    return cfg


def _validated(data: dict[str, Any], path: str | Path, overrides: list[str],
               resolve_data: bool) -> tuple[ExperimentConfig | None, list[str]]:
    """``(config, [])``, or ``(None, errors)`` with the ``--set`` that gave each value named."""
    try:
        return validate(data, str(path), resolve_data), []
    except ConfigError as exc:
        return None, [_blame_override(e, overrides) for e in exc.errors]


def _quick_blame(error: str, quick: dict[str, Any]) -> str:
    """``, from quick: KEY`` when a ``quick:`` override set the key of ``error`` (or a parent)."""
    set_key = _setter(error, [str(k) for k in quick])
    return f", from quick: {set_key}" if set_key is not None else ""


def _blame_override(error: str, overrides: list[str]) -> str:
    """``error``, plus which ``--set`` gave the value when one set that key (or a parent)."""
    for assignment in reversed(overrides):  # the last one wins, as when applying them
        if _setter(error, [assignment.partition("=")[0]]) is not None:
            shown = assignment if len(assignment) <= 80 else assignment[:77] + "..."
            return f"{error} (from --set {shown})"
    return error


def _setter(error: str, keys: list[str]) -> str | None:
    """The last of ``keys`` that set the key ``error`` names, a parent or a child of it."""
    key = error.split(": ", 1)[0]
    for set_key in reversed(keys):  # the last one wins, as when applying them
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return set_key
    return None
