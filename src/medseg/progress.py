"""Progress bars that stay quiet when asked to (tests, services)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    # disable=None: no bar when stderr is not a terminal (CI logs, pipes).
    yield from tqdm(
        items,
        total=total,
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        disable=None,
    )
