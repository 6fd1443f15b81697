"""Uncertainty of a prediction made by several members: folds, mirrored copies, MC-dropout samples.

Each member gives class probabilities ``p_m`` (after the model folder's temperature, see
:class:`medseg.model_folder.Calibration`). From them:

* the predictive entropy ``H(mean_m p_m)`` (total uncertainty, nats);
* the mutual information ``H(mean_m p_m) - mean_m H(p_m)`` (the part on which the members
  disagree, "epistemic"); zero for a single member;
* per-case scores (:data:`CASE_SCORES`) that ``medseg predict --qc`` reports and that
  ``medseg calibrate`` thresholds on the validation folds.

Calibrated probabilities are written as a 4D NIfTI (x, y, z, class) of 16-bit integers with
``scl_slope = 1/65535`` (NIfTI-1 has no float16 type; readers that apply the slope get the
probabilities back to 1.5e-5) or as a compressed NPZ holding float16.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.io.image import Image

# Per-case scores; larger means less trustworthy.
CASE_SCORES = ("dice_gap", "entropy_ratio", "mi_ratio")
PROBABILITY_FORMATS = ("nifti", "npz")
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over axis 0 of ``(K, *S)`` probabilities, float32 ``(*S)``."""
    out = torch.zeros(probs.shape[1:], dtype=torch.float32)
    for c in range(probs.shape[0]):
        p = probs[c].float()
        out -= p * torch.log(p.clamp_min(1e-12))
    return out


class MemberAccumulator:
    """Running sums over members of logits, probabilities and member entropies.

    Parameters are added one member at a time (:meth:`add`), so memory is a few
    ``(K, *S)`` volumes whatever the number of members.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sum_logits: torch.Tensor | None = None
        self.sum_probs: torch.Tensor | None = None
        self.sum_entropy: torch.Tensor | None = None

    def add(self, logits: torch.Tensor) -> None:
        """Add one member's (temperature-scaled) ``(K, *S)`` logits."""
        logits = logits.float()
        probs = torch.softmax(logits, dim=0)
        ent = entropy(probs)
        if self.sum_logits is None:
            self.sum_logits, self.sum_probs, self.sum_entropy = logits.clone(), probs, ent
        else:
            self.sum_logits += logits
            self.sum_probs += probs
            self.sum_entropy += ent
        self.count += 1

    def _need(self) -> None:
        if self.count == 0:
            raise ValueError("no member was added")

    def mean_logits(self) -> torch.Tensor:
        """Mean logits (nnU-Net's ensemble); their softmax are the written probabilities."""
        self._need()
        return self.sum_logits / self.count

    def mean_probabilities(self) -> torch.Tensor:
        """Mean of the members' probabilities."""
        self._need()
        return self.sum_probs / self.count

    def mutual_information(self) -> torch.Tensor:
        """``H(mean p_m) - mean H(p_m)`` (>= 0; zero for one member), float32 ``(*S)``."""
        self._need()
        mi = entropy(self.mean_probabilities()) - self.sum_entropy / self.count
        return mi.clamp_min_(0.0)


def case_scores(
    probs: torch.Tensor, entropy_map: torch.Tensor, mutual_information: torch.Tensor | None
) -> dict[str, float]:
    """Per-case uncertainty scores of ``(K, *S)`` probabilities (larger: less trustworthy).

    * ``dice_gap``: 1 - the Dice that the probabilities expect of their own argmax,
      ``2 sum(p_c [label = c]) / (sum p_c + |label = c|)``, averaged over the foreground
      classes present in either (0 when none is);
    * ``entropy_ratio``: summed entropy over the predicted foreground volume (voxels);
    * ``mi_ratio``: summed mutual information over the predicted foreground volume.
    """
    label = probs.argmax(0)
    gaps = []
    for c in range(1, probs.shape[0]):
        p = probs[c].float()
        mask = label == c
        denominator = float(p.sum()) + float(mask.sum())
        if denominator > 0.5:  # skip classes neither predicted nor expected
            gaps.append(1.0 - 2.0 * float(p[mask].sum()) / denominator)
    foreground = max(int((label > 0).sum()), 1)
    mi = float(mutual_information.sum()) if mutual_information is not None else 0.0
    return {
        "dice_gap": float(np.mean(gaps)) if gaps else 0.0,
        "entropy_ratio": float(entropy_map.sum()) / foreground,
        "mi_ratio": mi / foreground,
        "foreground_voxels": float((label > 0).sum()),
    }


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has a dropout layer with a non-zero rate (MC dropout needs one)."""
    return any(isinstance(m, _DROPOUT) and float(m.p) > 0 for m in model.modules())


class MCDropoutForward:
    """A network as a callable that runs with its dropout layers on (everything else in eval).

    Not an ``nn.Module``, so the sliding window does not put it back into eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        for m in self.dropouts:
            m.train()
        try:
            return self.model(x)
        finally:
            for m in self.dropouts:
                m.eval()


def _nifti_affine(reference: Image) -> np.ndarray:
    """The RAS affine of an :class:`Image` (its geometry is LPS, as ITK's)."""
    ndim = reference.ndim
    direction = np.asarray(reference.direction, dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(4)
    affine[:ndim, :ndim] = direction * np.asarray(reference.spacing)[None, :]
    affine[:ndim, 3] = reference.origin
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS -> RAS
    return flip @ affine


def write_probabilities(
    probs: np.ndarray,
    reference: Image,
    path: str | os.PathLike,
    *,
    labels: dict[int, str] | None = None,
) -> Path:
    """Write ``(K, *S)`` probabilities in ``reference``'s geometry as NIfTI or NPZ (by suffix).

    ``.nii.gz``: 4D (x, y, z, class), uint16 with ``scl_slope`` 1/65535. ``.npz``:
    ``probabilities`` (float16, ``(K, *S)``), ``spacing``, ``origin``, ``direction``,
    ``labels``. Written to a temporary file and renamed.
    """
    import nibabel as nib

    path = Path(path)
    if probs.shape[1:] != reference.shape:
        raise MedsegError(f"{path}: probabilities {probs.shape[1:]} vs image {reference.shape}")
    tmp = path.with_name(f".tmp-{path.name}")
    if path.name.endswith(".npz"):
        names = labels or {}
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                probabilities=probs.astype(np.float16),
                spacing=np.asarray(reference.spacing),
                origin=np.asarray(reference.origin),
                direction=np.asarray(reference.direction),
                labels=np.asarray([names.get(c, str(c)) for c in range(probs.shape[0])]),
            )
    else:
        data = np.clip(np.rint(np.moveaxis(probs, 0, -1) * 65535.0), 0, 65535).astype(np.uint16)
        if reference.ndim == 2:  # a 2D image: (x, y, 1, class)
            data = data[:, :, None, :]
        image = nib.Nifti1Image(data, _nifti_affine(reference))
        image.header.set_slope_inter(1.0 / 65535.0, 0.0)
        image.header.set_xyzt_units("mm")
        nib.save(image, tmp)  # nibabel picks gzip from the suffix
    os.replace(tmp, path)
    return path


def read_probabilities(path: str | os.PathLike) -> np.ndarray:
    """``(K, *S)`` float32 probabilities written by :func:`write_probabilities`."""
    import nibabel as nib

    path = Path(path)
    if path.name.endswith(".npz"):
        with np.load(path) as data:
            return data["probabilities"].astype(np.float32)
    data = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    return np.moveaxis(data, -1, 0)
