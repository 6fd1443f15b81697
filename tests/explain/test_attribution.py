"""Attributions land where the model looks; one-line errors for wrong classes and regions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.inference import make_model_dir, write_cases
from torch import nn

from medseg.errors import MedsegError
from medseg.explain import (
    RegionTarget,
    attribute,
    explain_files,
    positive_mass_share,
    resolve_class,
)
from medseg.io import Image, read_image, write_image


class QuadrantModel(nn.Module):
    """Class 1's logit everywhere is the mean intensity of the quadrant x < 8, y < 8 only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0  # identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        quadrant = torch.zeros_like(features)
        quadrant[..., :8, :8] = 1.0
        seen = (features * quadrant).flatten(1).sum(1) / 64.0
        logit = seen[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients", "gradcam"])
def test_attribution_of_a_quadrant_model_lands_in_that_quadrant(method):
    x = torch.rand(1, 1, 16, 16) + 0.5  # positive: every visible voxel raises the logit
    region = torch.ones(1, 16, 16, dtype=torch.bool)  # the target: the whole image
    target = RegionTarget(QuadrantModel(), region, class_index=1).eval()
    attr = attribute(target, x.requires_grad_(method != "occlusion"), method, window=(4, 4))
    attr = attr.detach().numpy()
    quadrant = np.zeros((16, 16), dtype=bool)
    quadrant[:8, :8] = True
    if method == "gradcam":
        # Grad-CAM weighs a layer's channels by their mean gradient: it shows where the
        # (positive) activations are, so it cannot single out the quadrant of a global mean
        assert attr.shape == (16, 16) and (attr >= 0).all()
        return
    assert positive_mass_share(attr, quadrant) == pytest.approx(1.0)
    assert np.abs(attr[~quadrant]).max() < 1e-6 and attr[quadrant].min() > 0


def test_resolve_class_by_name_or_value_and_errors():
    labels = {0: "background", 1: "liver", 2: "lesion"}
    assert resolve_class(labels, "Lesion") == (2, "lesion")
    assert resolve_class(labels, 1) == (1, "liver")
    with pytest.raises(MedsegError, match="class 'spleen' is not in the model"):
        resolve_class(labels, "spleen")
    with pytest.raises(MedsegError, match="background"):
        resolve_class(labels, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    return make_model_dir(root), write_cases(root / "in", 1) / "case_00.nii.gz"


@pytest.mark.parametrize("method", ["occlusion", "gradcam", "integrated_gradients"])
def test_explain_writes_map_overlay_record_and_report(tiny, tmp_path, method):
    model, image = tiny
    region = read_image(image).with_array(np.zeros((20, 18, 17), np.uint8))
    region.array[5:12, 6:12, 4:10] = 1
    mask = write_image(region, tmp_path / "region.nii.gz")
    record = explain_files(
        model, image, tmp_path / "out", method=method, class_value="class1", region=mask,
        device="cpu", steps=4,
    )  # fmt: skip
    out = tmp_path / "out"
    attribution = read_image(out / record["files"]["map"])
    assert attribution.shape == (20, 18, 17) and np.isfinite(attribution.array).all()
    assert (out / record["files"]["overlay"]).read_bytes().startswith(b"\x89PNG")
    assert "case_00" in (out / "report.html").read_text()
    assert 0.0 <= record["positive_mass_in_region"] <= record["positive_mass_in_dilated_region"]


def test_explain_refuses_a_region_of_another_geometry(tiny, tmp_path):
    model, image = tiny
    shifted = Image(np.ones((20, 18, 17), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    mask = write_image(shifted, tmp_path / "other.nii.gz")  # the image's origin is (1, 2, 3)
    with pytest.raises(MedsegError, match="another geometry than the image") as info:
        explain_files(model, image, tmp_path / "out", method="occlusion", class_value=1,
                      region=mask, device="cpu")  # fmt: skip
    assert str(info.value).startswith(str(mask)) and "\n" not in str(info.value)
    with pytest.raises(MedsegError, match="is not in the model"):
        explain_files(model, image, tmp_path / "out", method="occlusion", class_value="tumour",
                      device="cpu")  # fmt: skip


def test_a_case_smaller_than_the_patch_is_padded_for_the_network(tmp_path):
    model = make_model_dir(tmp_path)  # patch 16, two stages: sizes must be even
    cases = write_cases(tmp_path / "in", 1, shape=(11, 9, 13))
    record = explain_files(model, cases / "case_00.nii.gz", tmp_path / "out",
                           method="gradcam", class_value=1, device="cpu",
                           region=write_image(read_image(cases / "case_00.nii.gz").with_array(
                               np.ones((11, 9, 13), np.uint8)), tmp_path / "r.nii.gz"))  # fmt: skip
    assert read_image(tmp_path / "out" / record["files"]["map"]).shape == (11, 9, 13)
