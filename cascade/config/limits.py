"""Size limits of a config, enforced before the expensive work: a config file is small
data, and one that is not (a list of a million targets, YAML aliases standing for
billions of values) is refused in one line instead of taking minutes and gigabytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cascade.core.errors import CascadeError

#: the most items a config list may hold (seeds, targets, budgets, milestones, stages,
#: methods): far more than any experiment needs, few enough to validate in milliseconds
MAX_ITEMS = 1000
#: the largest config file read (the repo's are under 4 kB): a bigger one is refused
#: before it is parsed (PyYAML takes seconds per megabyte)
MAX_CONFIG_BYTES = 1 << 20
#: the most values (mappings, lists and scalars, counted through YAML aliases) a config
#: may hold: a few aliases can otherwise stand for billions of values
MAX_CONFIG_VALUES = 100_000


def check_file_size(path: Path) -> None:
    """Refuse a config file over :data:`MAX_CONFIG_BYTES`, before reading it.

    Raises:
        CascadeError: naming the file and its size.
    """
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CascadeError(f"{path}: {size / 1e6:.1f} MB; a config is at most {MAX_CONFIG_BYTES >> 20} MB (a list of "
                           f"thousands of values? lists hold at most {MAX_ITEMS} items)")


def check_value_count(path: Path, data: Any) -> None:
    """Refuse parsed config data holding over :data:`MAX_CONFIG_VALUES` values.

    Raises:
        CascadeError: naming the file and the key where the count passed the limit.
    """
    crowded = _crowded_key(data)
    if crowded is not None:
        raise CascadeError(f"{path}: {crowded}: the config holds more than {MAX_CONFIG_VALUES} values (counted "
                           f"through YAML aliases) from here on; lists hold at most {MAX_ITEMS} items")


def _crowded_key(data: Any, limit: int = MAX_CONFIG_VALUES) -> str | None:
    """The key path at which a walk through ``data`` (aliases followed, so a value shared
    by many keys counts each time) passes ``limit`` values, or None. Values are counted
    before they are visited, so the walk stops within ``limit`` steps, however many values
    the aliases stand for."""
    count = 1
    stack: list[tuple[str, Any]] = [("<root>", data)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, (dict, list)):
            count += len(node)
            if count > limit:
                return key
            if isinstance(node, dict):
                stack += [(str(k) if key == "<root>" else f"{key}.{k}", v) for k, v in node.items()]
            else:
                stack += [(key, v) for v in node]
    return None
