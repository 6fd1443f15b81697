"""Contract tests over every registered segmentation model, in each dimension it supports.

Parametrized from the registry, so a newly registered model is covered automatically.
Models tagged with another task (e.g. registration) have their own contract and are skipped here.
"""

from __future__ import annotations

import pytest
import torch

from medseg.model_folder import build_network
from medseg.models import create_model, model_info, registered_models


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = [
    (name, ndim)
    for name in registered_models(task="segmentation")
    for ndim in model_info(name).dims
]


def tiny_model(name: str, ndim: int, *, deep_supervision: bool = True) -> torch.nn.Module:
    return create_model(
        name,
        ndim=ndim,
        in_channels=2,
        num_classes=3,
        features=(4, 8, 16),
        strides=[(1,) * ndim, (2,) * ndim, (2,) * ndim],
        kernel_sizes=[(3,) * ndim] * 3,
        deep_supervision=deep_supervision,
        **dict(model_info(name).tiny_options),
    )


@pytest.mark.parametrize(("name", "ndim"), CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_forward_backward_shapes_and_finite_gradients(name: str, ndim: int):
    torch.manual_seed(0)
    shape = (16, 24) if ndim == 2 else (16, 16, 8)
    model = tiny_model(name, ndim)
    x = torch.randn(2, 2, *shape)
    model.train()
    out = model(x)
    outputs = out if isinstance(out, list) else [out]
    assert outputs[0].shape == (2, 3, *shape)
    if isinstance(out, list):  # deep supervision: one output per scale the model declares
        scales = model.output_scales
        assert len(outputs) == len(scales)
        for o, scale in zip(outputs, scales):
            assert o.shape[2:] == tuple(s // f for s, f in zip(shape, scale))
    sum(o.square().mean() for o in outputs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, *shape)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", registered_models(task="segmentation"))
def test_deep_supervision_can_be_switched_off(name: str):
    ndim = model_info(name).dims[0]
    model = tiny_model(name, ndim, deep_supervision=False).train()
    shape = (16, 24) if ndim == 2 else (16, 16, 8)
    out = model(torch.randn(1, 2, *shape))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *shape)
    # What the trainer reads to weight deep-supervision outputs.
    assert not getattr(model, "deep_supervision", False)


def test_registry_knows_the_zoo():
    names = set(registered_models(task="segmentation"))
    assert {"unet", "resunet", "fcn", "attention_unet", "mobile_unet", "swinunetr"} <= names
    assert model_info("unet").task == "segmentation"
    with pytest.raises(KeyError, match="unknown model"):
        model_info("nope")


def test_mobile_model_is_the_plan_unet_at_half_width_with_batch_norm():
    kw = dict(ndim=3, in_channels=1, num_classes=3, features=(32, 64, 128, 256))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    student, teacher = create_model("mobile_unet", **kw), create_model("unet", **kw)
    # Half the widths: about a quarter of the weights.
    assert 3.5 * count(student) < count(teacher) < 4.5 * count(student)
    norms = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert norms and not any(isinstance(m, torch.nn.GroupNorm) for m in student.modules())
    assert student.encoder[0][0][0].out_channels == 16
    with pytest.raises(ValueError, match="width"):
        create_model("mobile_unet", **kw, width=0)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown norm"):
        create_model("unet", ndim=2, in_channels=1, num_classes=2, norm="layer")


def test_attention_gates_weight_the_skips():
    model = tiny_model("attention_unet", 2).eval()
    gate = model.gates[0]
    skip, g = torch.randn(1, 8, 8, 12), torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        alpha = gate.psi(torch.relu(gate.theta(skip) + gate.phi(g)))
    assert alpha.shape == (1, 1, 4, 6) and (alpha > 0).all() and (alpha < 1).all()


@pytest.mark.parametrize(("name", "ndim"), CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_trainer_can_build_every_model_from_a_plan(name: str, ndim: int):
    """The exact call training and prediction make (plan's residual flag included)."""
    from medseg.planning.plan import NetworkPlan, Plan

    plan = Plan(
        dataset_name="t",
        ndim=ndim,
        configuration=f"{ndim}d",
        channel_names=("ct",),
        labels=((0, "background"), (1, "a")),
        target_spacing=(1.0,) * ndim,
        normalization=(),
        patch_size=(16,) * ndim,
        batch_size=2,
        network=NetworkPlan(
            name=name,
            features=(4, 8),
            strides=((1,) * ndim, (2,) * ndim),
            kernel_sizes=((3,) * ndim,) * 2,
            residual=True,
        ),
        median_shape=(16,) * ndim,
    )
    model = build_network(plan, deep_supervision=False, **dict(model_info(name).tiny_options))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, *(16,) * ndim)).shape == (1, 2, *(16,) * ndim)


@pytest.mark.parametrize(("name", "ndim"), CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_batchnorm_fusion_keeps_every_model_output(name: str, ndim: int):
    from medseg.models.fusion import fuse_conv_batchnorm

    torch.manual_seed(0)
    model = tiny_model(name, ndim, deep_supervision=False)
    size = (32,) * ndim
    with torch.no_grad():  # non-trivial running statistics, as after training
        for _ in range(3):
            model(torch.randn(2, 2, *size) * 3 + 1)
    model.eval()
    x = torch.randn(1, 2, *size)
    with torch.no_grad():
        before = model(x)
        fused = fuse_conv_batchnorm(model)
        after = model(x)
    if name == "mobile_unet":
        assert fused > 0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_batchnorm_fusion_removes_the_norm_passes_and_needs_eval_mode():
    from medseg.models.fusion import fuse_conv_batchnorm

    model = tiny_model("mobile_unet", 3, deep_supervision=False)
    with pytest.raises(ValueError, match="eval-mode"):
        fuse_conv_batchnorm(model)
    model.eval()
    count = sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert fuse_conv_batchnorm(model) == count
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    plain = tiny_model("unet", 3, deep_supervision=False).eval()
    assert fuse_conv_batchnorm(plain) == 0
