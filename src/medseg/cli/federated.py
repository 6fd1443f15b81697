"""``medseg`` commands of this group (work in progress this session)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this group's commands to the medseg parser."""
