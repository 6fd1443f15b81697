"""JSON round trips for the frozen dataclasses that stages pass to each other."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from medseg.imaging.atomic import atomic_path

T = TypeVar("T")


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def _coerce(value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if is_dataclass(hint) and isinstance(value, dict):
        return from_jsonable(hint, value)
    if origin is tuple and isinstance(value, list):
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return tuple(value)
    if origin is list and isinstance(value, list):
        (arg,) = get_args(hint) or (Any,)
        return [_coerce(v, arg) for v in value]
    if origin is not None and type(None) in get_args(hint):  # Optional[X]
        if value is None:
            return None
        inner = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0]) if len(inner) == 1 else value
    return value


def from_jsonable(cls: type[T], data: dict) -> T:
    """Build a dataclass from :func:`to_jsonable` output (lists become tuples where typed so)."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown field(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    return cls(**{k: _coerce(v, hints[k]) for k, v in data.items()})


def write_json_atomic(data: Any, path: str | os.PathLike, *, indent: int = 2) -> Path:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    with atomic_path(path, suffix=".json") as tmp, open(tmp, "w") as f:
        json.dump(to_jsonable(data), f, indent=indent)
        f.write("\n")
    return Path(path)
