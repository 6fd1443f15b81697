"""Temperature scaling (Guo et al., 2017): one temperature, or one per class, fitted by NLL.

The logits are divided by ``T`` before the softmax. ``T > 1`` softens over-confident
probabilities; a single ``T`` never changes the argmax (so the segmentation stays the same),
one ``T`` per class may move a few voxels near class boundaries.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError

MODES = ("global", "per_class")


def negative_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor | float = 1.0
) -> float:
    """Mean NLL of ``(N, K)`` logits divided by ``temperature`` (a number or ``(K,)``)."""
    t = torch.as_tensor(temperature, dtype=logits.dtype)
    with torch.no_grad():
        return float(F.cross_entropy(logits / t, labels))


def fit_temperature(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    mode: str = "global",
    max_iter: int = 200,
) -> tuple[float, ...]:
    """The temperature(s) that minimize the NLL of ``labels`` under ``softmax(logits / T)``.

    Parameters
    ----------
    logits
        ``(N, K)`` logits of N voxels (raw network output, before any temperature).
    labels
        ``(N,)`` class indices.
    mode
        ``"global"``: one temperature; ``"per_class"``: one per class (column of ``logits``).
    max_iter
        L-BFGS iterations (on ``log T``, so T stays positive).

    Returns
    -------
    tuple of float
        One temperature, or K.
    """
    if mode not in MODES:
        raise MedsegError(f"unknown calibration mode {mode!r} (use one of {', '.join(MODES)})")
    logits = torch.as_tensor(logits, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise MedsegError(
            f"temperature scaling needs (N, K) logits and N labels, got {tuple(logits.shape)}"
        )
    size = 1 if mode == "global" else logits.shape[1]
    log_t = torch.zeros(size, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = log_t.detach().exp()
    if not torch.isfinite(temperature).all():
        raise MedsegError("temperature scaling did not converge (non-finite temperature)")
    return tuple(float(t) for t in temperature)
