"""Small helpers every floor may use (the lowest floor: imports the standard library, torch and yaml only; torch
where a helper needs it, so that the command line starts without it)."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

# How the user's text tables (prompt lists, manifests, pair and score files) are read: UTF-8, with the byte-order
# mark that Excel's "CSV UTF-8" and Windows editors write dropped (it would glue itself to the first column name
# or the first prompt).
TEXT_ENCODING = "utf-8-sig"


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, cut to ``limit`` characters; its type's name when it has none."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def expand_like(
    coef: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-sample coefficients [B] (or a scalar) -> [B, 1, ..., 1] on ``like``'s device, broadcastable against
    ``like`` [B, ...], in ``dtype`` (default: ``like``'s dtype)."""
    import torch

    coef = torch.as_tensor(coef, device=like.device).to(dtype or like.dtype)
    return coef.reshape(-1, *([1] * (like.ndim - 1))) if coef.ndim else coef


def short_hash(data: bytes | str) -> str:
    """20 hex digits of SHA-1: a content key for cache entries (not a security boundary)."""
    return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()[:20]


def load_object(path: str) -> Any:
    """``"package.module:name"`` -> the object (registries' escape hatch for user code)."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{path!r} is not a 'package.module:name' path")
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"cannot import {module!r} for {path!r}: {err}") from err
    try:
        return getattr(mod, name)
    except AttributeError as err:
        raise ValueError(f"module {module!r} has no {name!r} ({path!r})") from err


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false (any case), not YAML 1.1's yes/no/on/off."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans: only ``true``/``false`` are booleans.

    PyYAML follows YAML 1.1, where ``no``, ``yes``, ``on`` and ``off`` are booleans too, so
    ``train.mixed_precision=no`` (accelerate's own spelling) arrived as ``False`` and was refused. Boolean keys
    still take yes/no/on/off (``_BOOL_WORDS``).
    """
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader)


def parse_key_values(items: Iterable[str], *, flag: str = "--set") -> dict[str, Any]:
    """``["scale=2", "mode=fast", "ids=[1, 2]"]`` -> ``{"scale": 2, "mode": "fast", "ids": [1, 2]}``.

    Values are read as YAML scalars/lists (numbers, booleans, lists); anything else stays a string.
    Raises ValueError naming ``flag`` and the item when it is not ``key=value``.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected key=value")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def read_jsonl_lenient(path: str | Path) -> list[dict[str, Any]]:
    """The JSON-object rows of a JSONL file that a crash may have cut: lines that do not parse (a torn last line)
    are skipped; a missing file has none. For files a command appends to as it goes (``.partial`` files)."""
    rows = []
    try:
        with Path(path).open(encoding=TEXT_ENCODING) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows
