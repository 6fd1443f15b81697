"""One settings object for paths and resources; never read from required environment variables."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from medseg.errors import MedsegError
from medseg.serialization import from_jsonable


@dataclass(frozen=True)
class Settings:
    work_dir: str = "medseg_work"
    num_workers: int = 2
    device: str = "auto"
    show_progress: bool = True

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Settings:
        """Read settings from a JSON file (unknown keys are an error)."""
        path = Path(path)
        try:
            return from_jsonable(cls, json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise MedsegError(f"{path}: cannot read settings ({exc})") from None

    def with_(self, **changes) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
