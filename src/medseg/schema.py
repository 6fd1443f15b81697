"""JSON schemas of the files in a model folder, and a small validator for them.

A model folder may come from anywhere, so its JSON files are checked against a schema before
any value is used: types, bounds (a plan that asks for a billion features or a patch of 10^6
voxels per side is refused before a network is built) and the agreements between fields
(one spacing and one patch size per axis, one normalization per channel).

The validator implements the subset of JSON Schema (draft 2020-12) that these schemas use:
``type``, ``enum``, ``minimum``, ``maximum``, ``exclusiveMinimum``, ``minItems``,
``maxItems``, ``items``, ``prefixItems``, ``properties``, ``required``, ``pattern`` and
``maxLength``. It has no dependency, and its messages name the file and the JSON path.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

__all__ = [
    "PLAN_SCHEMA",
    "WEIGHTS_METADATA_SCHEMA",
    "SchemaError",
    "check_plan_json",
    "read_checked_json",
    "schema_problems",
]

MAX_JSON_BYTES = 16 << 20  # a plan or a weights sidecar is a few kB


class SchemaError(MedsegError):
    """A JSON file of a model folder that does not match its schema."""


_INT = {"type": "integer"}
_STR = {"type": "string", "maxLength": 4096}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0, "maximum": 1e6}
_SMALL_INT_LIST = {
    "type": "array",
    "items": {"type": "integer", "minimum": 1, "maximum": 4096},
    "minItems": 1,
    "maxItems": 3,
}

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "dataset_name",
        "ndim",
        "configuration",
        "channel_names",
        "labels",
        "target_spacing",
        "normalization",
        "patch_size",
        "batch_size",
        "network",
        "median_shape",
    ],
    "properties": {
        "dataset_name": _STR,
        "ndim": {"type": "integer", "minimum": 2, "maximum": 3},
        "configuration": _STR,
        "channel_names": {"type": "array", "items": _STR, "minItems": 1, "maxItems": 64},
        "labels": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1000,
            "items": {
                "type": "array",
                "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 32767}, _STR],
                "minItems": 2,
                "maxItems": 2,
            },
        },
        "target_spacing": {"type": "array", "items": _POSITIVE, "minItems": 2, "maxItems": 3},
        "normalization": {
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {
                "type": "object",
                "required": ["scheme"],
                "properties": {
                    "scheme": _STR,
                    "clip_low": {"type": "number"},
                    "clip_high": {"type": "number"},
                    "mean": {"type": "number"},
                    "std": {"type": "number", "minimum": 0},
                },
            },
        },
        "patch_size": _SMALL_INT_LIST,
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 4096},
        "network": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[A-Za-z0-9_.\-]{1,100}$"},
                "features": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 4096},
                    "minItems": 1,
                    "maxItems": 12,
                },
                "strides": {
                    "type": "array",
                    "maxItems": 12,
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1, "maximum": 8},
                        "minItems": 2,
                        "maxItems": 3,
                    },
                },
                "kernel_sizes": {
                    "type": "array",
                    "maxItems": 12,
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1, "maximum": 15},
                        "minItems": 2,
                        "maxItems": 3,
                    },
                },
                "residual": {"type": "boolean"},
                "deep_supervision": {"type": "boolean"},
            },
        },
        "median_shape": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 1 << 20},
            "maxItems": 3,
        },
        "crop_to_nonzero": {"type": "boolean"},
        "image_resample_order": {"type": "integer", "minimum": 0, "maximum": 5},
        "label_resampling": _STR,
        "foreground_oversampling": {"type": "number", "minimum": 0, "maximum": 1},
        "compute_target": _STR,
        "notes": {"type": "array", "items": _STR, "maxItems": 1000},
        "filters": {"type": "array", "items": {"type": "object"}, "maxItems": 64},
    },
}

WEIGHTS_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "format_version": {"type": "integer", "minimum": 1, "maximum": 1000},
        "network": {"type": "string", "pattern": r"^[A-Za-z0-9_.\-]{1,100}$"},
        "epoch": {"type": "integer", "minimum": -1},
        "sha256": {"type": "string", "pattern": r"^[0-9a-f]{64}$"},
        "converted_from": _STR,
    },
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ),
}


def schema_problems(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema``, as ``"<json path>: <problem>"`` lines."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](value) for t in names):
            return [f"{where}: expected {' or '.join(names)}, got {_describe(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where}: {value} is below {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            problems.append(f"{where}: {value} must be above {schema['exclusiveMinimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where}: {value} is above {schema['maximum']}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{where}: string longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where}: {value[:60]!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            problems.append(f"{where}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{where}: more than {schema['maxItems']} items")
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(value[: schema.get("maxItems", len(value))]):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            if sub is not None:
                problems += schema_problems(item, sub, f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{where}: missing {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += schema_problems(value[key], sub, f"{where}.{key}")
    return problems


def _describe(value: Any) -> str:
    text = json.dumps(value)[:40] if value is not None else "null"
    return f"{type(value).__name__} {text}"


def _plan_agreements(plan: dict[str, Any]) -> list[str]:
    """Problems between fields of a plan that each passed the schema."""
    ndim = plan["ndim"]
    problems = []
    for key in ("target_spacing", "patch_size"):
        if len(plan[key]) != ndim:
            problems.append(f"$.{key}: {len(plan[key])} values for a {ndim}D plan")
    if len(plan["normalization"]) != len(plan["channel_names"]):
        problems.append(
            f"$.normalization: {len(plan['normalization'])} entries for "
            f"{len(plan['channel_names'])} channel(s)"
        )
    values = [label[0] for label in plan["labels"]]
    if len(set(values)) != len(values):
        problems.append("$.labels: a label value appears twice")
    network = plan["network"]
    for key in ("strides", "kernel_sizes"):
        rows = network.get(key) or []
        if any(len(row) != ndim for row in rows):
            problems.append(f"$.network.{key}: every entry needs {ndim} values")
        if rows and "features" in network and len(rows) != len(network["features"]):
            problems.append(f"$.network.{key}: one entry per feature level")
    return problems


def read_checked_json(path: str | os.PathLike, schema: dict[str, Any]) -> Any:
    """Parse ``path`` and check it against ``schema``.

    Raises
    ------
    SchemaError
        One line naming the file: unreadable, too large, not JSON, or the first problems
        found against the schema (where a schema asks for a number, NaN and Infinity are
        refused).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise SchemaError(f"{path}: {size} bytes is too large for this JSON file")
        text = path.read_text(encoding="utf-8")
        value = json.loads(text)  # NaN/Infinity parse; "number" in a schema means finite
    except SchemaError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SchemaError(f"{path}: not valid JSON ({detail})") from None
    problems = schema_problems(value, schema)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SchemaError(f"{path}: does not match its schema: {'; '.join(problems[:3])}{more}")
    return value


def check_plan_json(path: str | os.PathLike) -> dict[str, Any]:
    """A model folder's ``plan.json``, checked against :data:`PLAN_SCHEMA` and for agreement."""
    plan = read_checked_json(path, PLAN_SCHEMA)
    problems = _plan_agreements(plan)
    if problems:
        raise SchemaError(f"{path}: inconsistent plan: {'; '.join(problems[:3])}")
    return plan
