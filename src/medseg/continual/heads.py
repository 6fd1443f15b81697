"""Growing a trained network's output heads for new classes, old classes untouched.

Old classes keep their ids, so growing a head means appending output channels: the rows
of every head layer that belong to old classes are copied as they are, and the new rows
are initialized (:func:`grow_state_dict`, the weights of an ordinary grown network).

A convolution with more output channels may sum in another order (oneDNN blocks output
channels), which changes old logits in the last bit. :class:`GrownNetwork` trains the
extension step instead: the old network's modules unchanged, plus one extra convolution
per head for the new classes, whose output is appended to the old head's. The old
channels' logits are then the old network's, bit for bit, right after growth
(``init="copy"``). Its ``state_dict`` is the ordinary grown network's (heads
concatenated), so checkpoints and model folders stay ordinary.

``init="mib"`` follows MiB (Cermelli et al., CVPR 2020): the new classes start as copies
of the background classifier and the background bias and the new biases are lowered by
``log(n_new + 1)``, so the old network's background probability is shared evenly between
the background and the new classes and the old foreground logits stay bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

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


class GrownNetwork(nn.Module):
    """The old network plus one convolution per output head for the new classes.

    Parameters
    ----------
    base
        The old architecture with ``old_classes`` outputs (the module trains as it is).
    old_classes, new_classes
        Output classes before and after growth, background included.
    heads
        Names of the head convolutions in ``base`` (their output channels are the
        classes), e.g. ``["heads.0", "heads.1"]``; see :func:`head_modules`.

    Notes
    -----
    ``state_dict()`` and ``load_state_dict()`` speak the ordinary grown network's keys
    and shapes (old rows first), so the engine's weights and checkpoints are those of
    ``build_network`` with ``new_classes`` outputs. Attributes the task reads
    (``deep_supervision``, ``output_scales``, ``encoder``, ``decoder``) are ``base``'s.
    """

    def __init__(
        self, base: nn.Module, *, old_classes: int, new_classes: int, heads: list[str]
    ) -> None:
        super().__init__()
        if new_classes <= old_classes:
            raise ValueError("a grown network needs more classes than the old one")
        self.base = base
        self.old_classes, self.new_classes = old_classes, new_classes
        self.head_names = list(heads)
        self.extra = nn.ModuleList()
        modules = dict(base.named_modules())
        for name in self.head_names:
            head = modules.get(name)
            if not isinstance(head, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise MedsegError(
                    f"cannot grow head {name}: a {type(head).__name__}, not a convolution"
                )
            if head.out_channels != old_classes or head.groups != 1:
                raise MedsegError(
                    f"cannot grow head {name}: {head.out_channels} outputs, expected {old_classes}"
                )
            extra = type(head)(
                head.in_channels,
                new_classes - old_classes,
                head.kernel_size,
                head.stride,
                head.padding,
                head.dilation,
                bias=head.bias is not None,
            )
            self.extra.append(extra)
            head.register_forward_hook(self._append(extra))

    @staticmethod
    def _append(extra: nn.Module):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return torch.cat((output, extra(inputs[0])), dim=1)

        return hook

    def forward(self, x: torch.Tensor):
        return self.base(x)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("deep_supervision", "output_scales", "encoder", "decoder", "strides"):
                return getattr(super().__getattr__("base"), name)
            raise

    def state_dict(self, *args, **kwargs):  # noqa: D102 - the ordinary network's keys
        state = self.base.state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name, extra in zip(self.head_names, self.extra):
            for p in ("weight", "bias"):
                key = f"{prefix}{name}.{p}"
                value = getattr(extra, p)
                if key in state and value is not None:
                    state[key] = torch.cat((state[key], value.detach()), dim=0)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        base_state = dict(state_dict)
        for name, extra in zip(self.head_names, self.extra):
            for p in ("weight", "bias"):
                key = f"{name}.{p}"
                if key not in base_state or getattr(extra, p) is None:
                    continue
                full = base_state[key]
                base_state[key] = full[: self.old_classes]
                with torch.no_grad():
                    getattr(extra, p).copy_(full[self.old_classes :])
        return self.base.load_state_dict(base_state, strict=strict, assign=assign)


def head_modules(
    old_state: Mapping[str, torch.Tensor], new_state: Mapping[str, torch.Tensor]
) -> list[str]:
    """Names of the modules whose tensors grow (``heads.0`` for ``heads.0.weight``)."""
    return sorted({k.rsplit(".", 1)[0] for k in grown_tensors(old_state, new_state)})
