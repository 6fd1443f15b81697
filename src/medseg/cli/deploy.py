"""Commands of the deploy group (export, fast batch prediction) (see :func:`add_commands`)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this group's sub-commands to the medseg parser."""
