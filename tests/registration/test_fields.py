"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from helpers.registration import blobs

from medseg.io import Image
from medseg.registration.fields import (
    compose,
)
from medseg.registration.learned import (
    integrate_velocity,
    warp,
)
from medseg.registration.quality import (
    jacobian_of_field,
)


def test_compose_applies_the_last_transform_first():
    a = sitk.TranslationTransform(2, (1.0, 0.0))
    b = sitk.Euler2DTransform((0.0, 0.0), np.pi / 2, (0.0, 0.0))
    p = compose(a, b).TransformPoint((1.0, 0.0))  # a(b(p)) = a((0, 1)) = (1, 1)
    assert np.allclose(p, (1.0, 1.0))


def test_scaling_and_squaring_has_no_folding_where_the_plain_field_folds():
    torch.manual_seed(0)
    coarse = torch.randn(1, 3, 4, 4, 4) * 6.0
    v = F.interpolate(coarse, size=(32, 32, 32), mode="trilinear", align_corners=True)
    grid = Image(np.zeros((32, 32, 32), np.float32), (1.0, 1.0, 1.0))
    plain = jacobian_of_field(v[0].movedim(0, -1).double().numpy(), grid)
    assert (plain <= 0).mean() > 0.01  # the velocity itself, used as a displacement, folds
    disp = integrate_velocity(v, steps=7)
    jac = jacobian_of_field(disp[0].movedim(0, -1).double().numpy(), grid)
    assert (jac[2:-2, 2:-2, 2:-2] <= 0).sum() == 0
    inverse = integrate_velocity(-v, steps=7)
    roundtrip = inverse + warp(disp, inverse)  # disp o inverse should be the identity
    assert roundtrip[..., 4:-4, 4:-4, 4:-4].abs().mean() < 0.05


def test_warp_matches_a_known_translation():
    img = torch.from_numpy(blobs((20, 24, 16)))[None, None]
    disp = torch.zeros(1, 3, 20, 24, 16)
    disp[:, 0] = 2.0  # sample two voxels further along the first axis
    out = warp(img, disp)
    assert torch.allclose(out[0, 0, :-2], img[0, 0, 2:], atol=1e-4)
