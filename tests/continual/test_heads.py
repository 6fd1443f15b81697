"""Head growth: old classes keep their ids and, right after growth, their logits bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from medseg.continual.heads import GrownNetwork, grow_state_dict, grown_tensors, head_modules
from medseg.errors import MedsegError
from medseg.models import create_model

KW = dict(
    ndim=3,
    in_channels=1,
    features=(4, 8, 16),
    strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
    kernel_sizes=None,
    residual=False,
    deep_supervision=True,
)


def _grown(old_classes: int, new_classes: int, *, name: str = "unet", init: str = "copy"):
    """The old network, and the grown one as the extension step trains it."""
    torch.manual_seed(0)
    old = create_model(name, num_classes=old_classes, **KW)
    fresh = create_model(name, num_classes=new_classes, **KW).state_dict()
    start = grow_state_dict(
        old.state_dict(), fresh, old_classes=old_classes, new_classes=new_classes, init=init
    )
    grown = GrownNetwork(
        copy.deepcopy(old),
        old_classes=old_classes,
        new_classes=new_classes,
        heads=head_modules(old.state_dict(), fresh),
    )
    grown.load_state_dict(start)
    return old, grown, start


# (2, 4) and (3, 9): counts where one wider convolution differs from the old one in the
# last bit on oneDNN; the grown network must not
@pytest.mark.parametrize(
    "name, classes, fmt",
    [
        ("unet", (2, 4), torch.contiguous_format),
        ("unet", (3, 9), torch.channels_last_3d),
        ("resunet", (3, 5), torch.channels_last_3d),
    ],
)
def test_growth_keeps_old_logits_bit_identical(name, classes, fmt):
    c_old, c_new = classes
    old, grown, _ = _grown(c_old, c_new, name=name)
    x = torch.randn(1, 1, 16, 16, 16).contiguous(memory_format=fmt)
    old, grown = old.to(memory_format=fmt), grown.to(memory_format=fmt)
    with torch.no_grad():
        for mode in (False, True):  # inference, and training's deep-supervision outputs
            old.train(mode), grown.train(mode)
            before, after = old(x), grown(x)
            pairs = zip(before, after) if mode else [(before, after)]
            for b, a in pairs:
                assert a.shape[1] == c_new
                assert torch.equal(a[:, :c_old], b)  # bit for bit, background included


def test_grown_network_speaks_the_ordinary_state_dict():
    old, grown, start = _grown(2, 4)
    state = grown.state_dict()
    assert state.keys() == start.keys()
    for k in state:
        assert torch.equal(state[k], start[k])
    # an ordinary 4-class network loads it and computes the same up to float rounding
    plain = create_model("unet", num_classes=4, **KW)
    plain.load_state_dict(state)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), grown.eval()(x), rtol=1e-5, atol=1e-6)
    assert grown_tensors(old.state_dict(), state) == sorted(
        f"heads.{i}.{p}" for i in range(2) for p in ("bias", "weight")
    )
    # the old modules train as they are; the new classes' rows are extra parameters
    names = {n for n, _ in grown.named_parameters()}
    assert "base.heads.0.weight" in names and "extra.0.weight" in names


def test_mib_init_keeps_old_foreground_and_splits_background():
    old, grown, _ = _grown(3, 5, init="mib")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before, after = old.eval()(x), grown.eval()(x)
    assert torch.equal(after[:, 1:3], before[:, 1:3])  # old foreground logits untouched
    p_old, p_new = before.softmax(1), after.softmax(1)
    # the old background probability is shared by background and the two new classes
    torch.testing.assert_close(p_new[:, [0, 3, 4]].sum(1), p_old[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_new[:, 0], p_new[:, 3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_new[:, 1:3], p_old[:, 1:3], rtol=1e-5, atol=1e-6)


def test_growth_refuses_another_architecture():
    torch.manual_seed(0)
    old = create_model("unet", num_classes=2, **KW)
    other = create_model("unet", num_classes=3, **{**KW, "features": (4, 8, 32)})
    with pytest.raises(MedsegError, match="cannot grow"):
        grow_state_dict(old.state_dict(), other.state_dict(), old_classes=2, new_classes=3)


def test_growth_refuses_to_shrink():
    old = create_model("unet", num_classes=3, **KW)
    new = create_model("unet", num_classes=2, **KW)
    with pytest.raises(MedsegError, match="cannot shrink"):
        grow_state_dict(old.state_dict(), new.state_dict(), old_classes=3, new_classes=2)


def test_grown_network_refuses_a_head_that_is_not_a_convolution():
    old = create_model("unet", num_classes=2, **KW)
    with pytest.raises(MedsegError, match="not a convolution"):
        GrownNetwork(old, old_classes=2, new_classes=3, heads=["decoder.0"])
