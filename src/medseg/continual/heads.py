"""Growing a trained network's output heads for new classes, old classes untouched.

Old classes keep their ids, so growing a head means appending output channels: the rows
of every head layer that belong to old classes are copied as they are, and the new rows
are initialized. Every other tensor is copied unchanged, so right after growth the old
channels' logits are the old network's logits, bit for bit (``init="copy"``).

``init="mib"`` follows MiB (Cermelli et al., CVPR 2020): the new classes start as copies
of the background classifier and the background bias and the new biases are lowered by
``log(n_new + 1)``, so the old network's background probability is shared evenly between
the background and the new classes and the old foreground logits stay bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from medseg.errors import MedsegError

HEAD_INITS = ("copy", "mib")


def _class_axis(
    name: str, old: torch.Size, new: torch.Size, old_classes: int, new_classes: int
) -> int:
    """The axis of a head tensor that indexes classes (the one that grew)."""
    differing = [a for a, (o, n) in enumerate(zip(old, new)) if o != n]
    if (
        len(old) != len(new)
        or len(differing) != 1
        or old[differing[0]] != old_classes
        or new[differing[0]] != new_classes
    ):
        raise MedsegError(
            f"cannot grow layer {name}: shape {tuple(old)} -> {tuple(new)} is not "
            f"{old_classes} -> {new_classes} output classes (another architecture?)"
        )
    return differing[0]


def grow_state_dict(
    old_state: Mapping[str, torch.Tensor],
    new_state: Mapping[str, torch.Tensor],
    *,
    old_classes: int,
    new_classes: int,
    init: str = "copy",
) -> dict[str, torch.Tensor]:
    """The old network's weights in the grown network's shapes.

    Parameters
    ----------
    old_state
        The trained network's state dict (``old_classes`` outputs).
    new_state
        A freshly initialized state dict of the same architecture with ``new_classes``
        outputs: its shapes, and the initial values of the new rows (``init="copy"``).
    old_classes, new_classes
        Output classes before and after, background included.
    init
        ``"copy"``: new rows keep ``new_state``'s initialization and every old logit is
        unchanged. ``"mib"``: MiB's background-aware initialization (module docstring).

    Returns
    -------
    dict
        Tensors by name, loadable into the grown network.

    Raises
    ------
    MedsegError
        When a tensor is missing or changed shape other than in its class axis.
    """
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head initialization {init!r} (use {', '.join(HEAD_INITS)})")
    if new_classes < old_classes:
        raise MedsegError(f"a head cannot shrink ({old_classes} -> {new_classes} classes)")
    missing = sorted(set(new_state) ^ set(old_state))
    if missing:
        raise MedsegError(
            f"cannot grow the network: tensors {', '.join(missing[:3])} exist in only one "
            "of the old and the grown network (another architecture?)"
        )
    grown: dict[str, torch.Tensor] = {}
    shift = math.log(new_classes - old_classes + 1)
    for name, fresh in new_state.items():
        old = old_state[name]
        if old.shape == fresh.shape:
            grown[name] = old.detach().clone()
            continue
        axis = _class_axis(name, old.shape, fresh.shape, old_classes, new_classes)
        value = fresh.detach().clone().to(old.dtype)
        value.narrow(axis, 0, old_classes).copy_(old)
        if init == "mib":
            new_rows = value.narrow(axis, old_classes, new_classes - old_classes)
            background = old.narrow(axis, 0, 1)
            if old.ndim == 1:  # a bias: background and new classes share p(background)
                new_rows.copy_((background - shift).expand_as(new_rows))
                value.narrow(axis, 0, 1).copy_(background - shift)
            else:
                new_rows.copy_(background.expand_as(new_rows))
        grown[name] = value
    return grown


def grown_tensors(
    old_state: Mapping[str, torch.Tensor], new_state: Mapping[str, torch.Tensor]
) -> list[str]:
    """Names of the tensors whose shape differs (the head layers that grow)."""
    return sorted(
        k for k in new_state if k in old_state and old_state[k].shape != new_state[k].shape
    )
