"""Label names to the SNOMED-CT codes that DICOM SEG segments carry (an editable table)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from medseg.errors import MedsegError

ANATOMY = ("SCT", "91723000", "Anatomical Structure")
TISSUE = ("SCT", "85756007", "Tissue")
_SIDES = re.compile(r"\b(left|right|l|r)\b")


@dataclass(frozen=True)
class SegmentCode:
    """Category and type codes of one segment, each ``(scheme, value, meaning)``."""

    category: tuple[str, str, str]
    type: tuple[str, str, str]
    source: str  # "table", "snomed" or "fallback": how the name was matched


def _normalise(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", name.lower()).split())


def load_code_table(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The built-in table, updated by the user's JSON file (same layout) when given."""
    text = resources.files("medseg.dicom").joinpath("label_codes.json").read_text()
    table = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    if path is not None:
        path = Path(path)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MedsegError(f"{path}: cannot read the label code table ({exc})") from None
        for name, entry in user.items():
            if name.startswith("_"):
                continue
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), list) and len(entry[k]) == 3 for k in ("category", "type")
            ):
                raise MedsegError(
                    f"{path}: entry {name!r} needs 'category' and 'type' as [scheme, value, meaning]"
                )
            table[name] = entry
    return {_normalise(k): v for k, v in table.items()}


def _snomed_lookup(name: str) -> tuple[str, str, str] | None:
    from pydicom.sr.codedict import codes

    words = _SIDES.sub(" ", name).split()
    for n in range(len(words), 0, -1):  # "kidney cyst" -> "KidneyCyst", then "Kidney"
        for start in range(len(words) - n + 1):
            keyword = "".join(w.capitalize() for w in words[start : start + n])
            try:
                code = getattr(codes.SCT, keyword)
            except (AttributeError, KeyError):
                continue
            return ("SCT", str(code.value), str(code.meaning))
    return None


def code_for_label(name: str, table: dict[str, dict] | None = None) -> SegmentCode:
    """Codes for one label name: the table first, then pydicom's SNOMED-CT names, then Tissue."""
    table = load_code_table() if table is None else table
    key = _normalise(name)
    for candidate in (key, _SIDES.sub(" ", key).strip()):
        candidate = " ".join(candidate.split())
        if candidate in table:
            entry = table[candidate]
            return SegmentCode(tuple(entry["category"]), tuple(entry["type"]), "table")
    found = _snomed_lookup(key)
    if found is not None:
        return SegmentCode(ANATOMY, found, "snomed")
    return SegmentCode(TISSUE, TISSUE, "fallback")
