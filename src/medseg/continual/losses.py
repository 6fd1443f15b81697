"""Loss terms of continual learning, written for N-d segmentation logits ``(B, C, *S)``.

- :func:`old_class_distillation`: LwF (Li & Hoiem, 2017) on the old classes' channels.
- :func:`unbiased_cross_entropy` and :func:`unbiased_distillation`: MiB (Cermelli et al.,
  CVPR 2020). In a class-incremental step the new data label old classes as background;
  the unbiased cross-entropy scores a background voxel by the probability of
  "background or any old class it does not label", and the unbiased distillation
  compares the old network's background with "background or any new class".
- :func:`pseudo_labels` and :func:`pod_distillation`: PLOP (Douillard et al., CVPR 2021).
  Background voxels that the old network confidently puts in an old class get that
  class; uncertain ones are ignored; multi-scale pooled features (POD) of the old and
  new network are kept close.
- :class:`MaskedDiceCE` and :class:`UnbiasedDiceCE`: the supervised losses of PLOP and
  MiB with a soft Dice term added over the classes the target labels (medseg trains with
  Dice + CE, as nnU-Net does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1  # target value of voxels that take no part in the supervised loss


def old_class_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
) -> torch.Tensor:
    """KL(teacher_T || student_T) over the teacher's classes, per voxel, times ``T^2``.

    The student's first ``C_old`` channels (the old classes keep their ids) are
    softmaxed among themselves, as LwF does for the old task's head.
    """
    c_old = teacher_logits.shape[1]
    log_q = torch.log_softmax(student_logits[:, :c_old].float() / temperature, dim=1)
    p = torch.softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_q, p, reduction="none").sum(1)
    return kl.mean() * temperature**2


def unbiased_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, background: Sequence[int]
) -> torch.Tensor:
    """MiB's cross-entropy: a voxel labelled 0 scores ``log sum_{c in background} p_c``.

    Parameters
    ----------
    logits
        ``(B, C, *S)``.
    target
        ``(B, 1, *S)`` integer labels (0: background as the new data see it).
    background
        Channels merged into the background: 0 and the old classes the new data do not
        label.
    """
    logits = logits.float()
    t = target[:, 0].long()
    log_z = torch.logsumexp(logits, dim=1)
    log_bg = torch.logsumexp(logits[:, list(background)], dim=1)
    picked = logits.gather(1, t.clamp_min(0).unsqueeze(1))[:, 0]
    log_p = torch.where(t == 0, log_bg, picked) - log_z
    return -log_p.mean()


def unbiased_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, new: Sequence[int]
) -> torch.Tensor:
    """MiB's distillation: ``-sum_c q_c log p~_c`` over the old classes, where the student's
    background probability ``p~_0`` is that of background or any new class ``new``."""
    c_old = teacher_logits.shape[1]
    s = student_logits.float()
    log_z = torch.logsumexp(s, dim=1, keepdim=True)
    log_bg = torch.logsumexp(s[:, [0, *new]], dim=1, keepdim=True)
    log_p = torch.cat((log_bg, s[:, 1:c_old]), dim=1) - log_z
    q = torch.softmax(teacher_logits.float(), dim=1)
    return -(q * log_p).sum(1).mean()


@torch.no_grad()
def pseudo_labels(
    target: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    quantile: float = 0.5,
) -> torch.Tensor:
    """PLOP's pseudo-labels: the target with its background voxels relabelled by the old
    network where that network is confident, and ignored where it is not.

    A background voxel that the old network puts in old class ``c > 0`` gets ``c`` when
    its normalized entropy is at most the ``quantile`` of the entropies of the voxels
    put in ``c`` in this batch (PLOP's per-class median rule), else :data:`IGNORE`.
    Voxels that the old network calls background stay background.
    """
    probs = torch.softmax(teacher_logits.float(), dim=1)
    c_old = probs.shape[1]
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1) / torch.log(
        torch.tensor(float(c_old))
    )
    guess = probs.argmax(1)
    t = target[:, 0].long().clone()
    free = t == 0
    for c in range(1, c_old):
        where = free & (guess == c)
        if not where.any():
            continue
        threshold = torch.quantile(entropy[where].float(), quantile)
        t[where & (entropy <= threshold)] = c
        t[where & (entropy > threshold)] = IGNORE
    return t.unsqueeze(1)


def pod_embedding(features: torch.Tensor, *, scales: Sequence[int] = (1, 2)) -> torch.Tensor:
    """Pooled Outputs Distillation embedding of ``(B, C, *S)`` features, shape ``(B, M)``.

    For every scale ``s`` the volume is cut into ``s`` parts along each axis; in every
    part the features are averaged over all axes but one, for each axis in turn (PLOP's
    width and height pooling, in N-d). Each pooled profile is L2-normalized.
    """
    f = features.float()
    spatial = f.shape[2:]
    parts: list[torch.Tensor] = []
    for s in scales:
        chunks = [f]
        for axis, size in enumerate(spatial):
            step = max(1, -(-size // s))
            chunks = [piece for c in chunks for piece in c.split(step, dim=2 + axis)]
        for chunk in chunks:
            for axis in range(len(spatial)):
                others = tuple(2 + a for a in range(len(spatial)) if a != axis)
                profile = chunk.mean(dim=others).flatten(1)
                parts.append(F.normalize(profile, dim=1))
    return torch.cat(parts, dim=1)


def pod_distillation(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    *,
    scales: Sequence[int] = (1, 2),
) -> torch.Tensor:
    """Mean over layers of the L2 distance of the POD embeddings of old and new features."""
    terms = [
        (pod_embedding(s, scales=scales) - pod_embedding(t, scales=scales)).norm(dim=1).mean()
        for s, t in zip(student, teacher)
    ]
    return torch.stack(terms).mean()


def _soft_dice_loss(
    probs: torch.Tensor, onehot: torch.Tensor, classes: Sequence[int], smooth: float = 1e-5
) -> torch.Tensor:
    """1 - mean batch soft Dice over ``classes`` (``probs`` and ``onehot`` already masked)."""
    if not classes:
        return probs.new_zeros(())
    idx = list(classes)
    dims = (0, *range(2, probs.ndim))
    p, r = probs[:, idx], onehot[:, idx]
    inter, pred, ref = (p * r).sum(dims), p.sum(dims), r.sum(dims)
    dice = (2 * inter + smooth) / (pred + ref + smooth).clamp_min(1e-8)
    return 1 - dice.mean()


class MaskedDiceCE(nn.Module):
    """Cross-entropy + soft Dice over every foreground class, ignoring :data:`IGNORE` voxels."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target[:, 0].long()
        ce = F.cross_entropy(logits.float(), t, ignore_index=IGNORE)
        if not (t != IGNORE).any():
            ce = logits.float().sum() * 0.0
        valid = (t != IGNORE).unsqueeze(1).float()
        probs = torch.softmax(logits.float(), dim=1) * valid
        onehot = F.one_hot(t.clamp_min(0), logits.shape[1]).movedim(-1, 1).float() * valid
        return ce + _soft_dice_loss(probs, onehot, range(1, logits.shape[1]))


class UnbiasedDiceCE(nn.Module):
    """MiB's unbiased cross-entropy + soft Dice over the classes the new data label.

    Parameters
    ----------
    background
        Channels merged into background (0 and the old classes the new data do not label).
    labelled
        Foreground classes the new data label (their Dice is trained).
    """

    def __init__(self, *, background: Sequence[int], labelled: Sequence[int]) -> None:
        super().__init__()
        self.background, self.labelled = list(background), list(labelled)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = unbiased_cross_entropy(logits, target, background=self.background)
        probs = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).float()
        return ce + _soft_dice_loss(probs, onehot, self.labelled)


def ewc_penalty(
    parameters: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``1/2 sum F (theta - theta*)^2`` over ``(parameter, anchor, fisher)`` triples
    (Kirkpatrick et al., PNAS 2017)."""
    total = None
    for p, anchor, fisher in parameters:
        term = (fisher * (p.float() - anchor) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("EWC needs at least one parameter")
    return 0.5 * total
