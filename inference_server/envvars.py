"""The ``INFERENCE_*`` environment layer, as a dynaconf loader.

Two spellings reach the same key: dynaconf's ``INFERENCE_SERVER__PORT`` and the seed's
``INFERENCE_SERVER_PORT``.  The seed's single-underscore names are ambiguous in general
(``logging_file_path``), so they are resolved against the tree of known keys.  Values are parsed
as TOML (``8080`` → int, ``["a"]`` → list), like dynaconf does.  Unlike dynaconf's own env loader
this one replaces a leaf (a list is replaced, never appended to) and keeps keys lower-case.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from dynaconf.utils.parse_conf import parse_conf_data

PREFIX = "INFERENCE_"
#: Sections whose children are user-chosen names: only the ``__`` spelling can address them.
DYNAMIC_SECTIONS = frozenset({"providers", "models", "secrets"})


def _known_tree() -> Mapping[str, Any]:
    from inference_server.settings import CORE_SCHEMA

    return CORE_SCHEMA


def _match(tokens: list[str], node: Mapping[str, Any]) -> list[str] | None:
    """Split ``tokens`` into a path of known keys, longest key first; None when impossible."""
    for end in range(len(tokens), 0, -1):
        key = "_".join(tokens[:end])
        if key not in node:
            continue
        child = node[key]
        rest = tokens[end:]
        if isinstance(child, Mapping):
            if not rest:
                return [key]
            sub = _match(rest, child)
            if sub is not None:
                return [key, *sub]
        elif not rest:
            return [key]
    return None


def resolve(name: str, tree: Mapping[str, Any] | None = None) -> list[str] | None:
    """Settings path for env var ``name`` (with the prefix), or None when it names no key."""
    rest = name[len(PREFIX) :].lower()
    if not rest:
        return None
    if "__" in rest:
        parts = rest.split("__")
        return parts if all(parts) else None
    tokens = rest.split("_")
    if tokens[0] in DYNAMIC_SECTIONS:
        return None
    return _match(tokens, tree if tree is not None else _known_tree())


def unresolved(environ: Mapping[str, str] | None = None) -> list[str]:
    """Names of ``INFERENCE_*`` variables that address no setting (reported as errors)."""
    env = os.environ if environ is None else environ
    return sorted(k for k in env if k.startswith(PREFIX) and resolve(k) is None)


def plain(value: Any) -> Any:
    """A deep copy of a dynaconf box as plain dicts (string keys, case kept) and lists, so a
    leaf can be replaced without merging and nothing after settings sees dynaconf types."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return copy.copy(value)


def load(
    obj: Any,
    env: str | None = None,
    silent: bool = True,
    key: str | None = None,
    filename: str | None = None,
    validate: bool = False,
) -> None:
    """Dynaconf loader entry point: apply every resolvable ``INFERENCE_*`` variable."""
    for name in sorted(os.environ):
        if not name.startswith(PREFIX):
            continue
        path = resolve(name)
        if path is None:
            continue
        value = parse_conf_data(os.environ[name], tomlfy=True, box_settings=obj)
        if len(path) == 1:
            obj.set(path[0], value, merge=False)
            continue
        top = obj.get(path[0])
        tree = plain(top) if isinstance(top, Mapping) else {}
        node = tree
        for part in path[1:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
        obj.set(path[0], tree, merge=False)
