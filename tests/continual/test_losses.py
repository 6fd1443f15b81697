"""Continual-learning loss terms against their definitions (values by construction)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medseg.continual.losses import (
    IGNORE,
    MaskedDiceCE,
    ewc_penalty,
    old_class_distillation,
    pod_distillation,
    pod_embedding,
    pseudo_labels,
    unbiased_cross_entropy,
    unbiased_distillation,
)


def test_unbiased_ce_is_plain_ce_without_merged_classes():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4)
    target = torch.randint(0, 3, (2, 1, 5, 4))
    expected = F.cross_entropy(logits, target[:, 0])
    torch.testing.assert_close(unbiased_cross_entropy(logits, target, background=[0]), expected)


def test_unbiased_ce_scores_background_as_background_or_old():
    logits = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    target = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    p = torch.softmax(logits.view(3), 0)
    expected = -math.log(float(p[0] + p[1]))  # class 1 is an old class the new data call 0
    assert math.isclose(
        float(unbiased_cross_entropy(logits, target, background=[0, 1])), expected, rel_tol=1e-6
    )


def test_unbiased_distillation_merges_new_classes_into_background():
    student = torch.tensor([0.2, 1.0, -0.3, 0.7]).view(1, 4, 1)  # classes 0, 1 old; 2, 3 new
    teacher = torch.tensor([0.5, -0.5]).view(1, 2, 1)
    p = torch.softmax(student.view(4), 0)
    q = torch.softmax(teacher.view(2), 0)
    expected = -(q[0] * torch.log(p[0] + p[2] + p[3]) + q[1] * torch.log(p[1]))
    got = unbiased_distillation(student, teacher, new=[2, 3])
    assert math.isclose(float(got), float(expected), rel_tol=1e-6)


def test_lwf_distillation_is_zero_when_old_channels_agree():
    teacher = torch.randn(2, 3, 4, 4)
    student = torch.cat((teacher, torch.randn(2, 2, 4, 4)), dim=1)
    assert float(old_class_distillation(student, teacher)) < 1e-6
    assert float(old_class_distillation(student, teacher + torch.randn_like(teacher))) > 1e-3


def test_pseudo_labels_fill_confident_background_and_ignore_the_rest():
    # four background voxels: the old network says class 1 with falling confidence, then bg
    logit1 = torch.tensor([6.0, 4.0, 0.2, -5.0])
    teacher = torch.stack((torch.zeros(4), logit1)).view(1, 2, 4)
    target = torch.tensor([0, 0, 0, 0]).view(1, 1, 4)
    out = pseudo_labels(target, teacher, quantile=0.5)
    # class-1 voxels (first three): the median entropy keeps the two most confident
    assert out.view(-1).tolist() == [1, 1, IGNORE, 0]
    labelled = torch.tensor([2, 0, 0, 0]).view(1, 1, 4)  # a new-class label is kept
    assert pseudo_labels(labelled, teacher).view(-1)[0] == 2


def test_masked_dice_ce_ignores_ignored_voxels():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6, 6)
    target = torch.randint(0, 3, (1, 1, 6, 6))
    noisy = target.clone()
    noisy[..., :3] = IGNORE
    changed_logits = logits.clone()
    changed_logits[..., :3] = torch.randn(1, 3, 6, 3)  # ignored voxels may say anything
    loss = MaskedDiceCE()
    torch.testing.assert_close(loss(logits, noisy), loss(changed_logits, noisy))


def test_pod_is_zero_for_equal_features_and_scale_free():
    f = torch.randn(2, 4, 8, 6, 4)
    assert float(pod_distillation([f], [f])) == 0.0
    assert float(pod_distillation([f], [3.0 * f])) < 1e-5  # profiles are L2-normalized
    assert float(pod_distillation([f], [torch.randn_like(f)])) > 0.1
    # scales 1 and 2 over three axes: 3 + 8 * 3 profiles of length C * axis size / s
    emb = pod_embedding(f, scales=(1, 2))
    assert emb.shape == (2, 4 * (8 + 6 + 4) + 8 * 4 * (4 + 3 + 2))


def test_ewc_penalty_by_hand():
    p = torch.tensor([1.0, 2.0])
    anchor = torch.tensor([0.0, 2.5])
    fisher = torch.tensor([2.0, 4.0])
    assert float(ewc_penalty([(p, anchor, fisher)])) == 0.5 * (2.0 * 1.0 + 4.0 * 0.25)
