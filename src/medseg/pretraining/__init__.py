"""Self-supervised pretraining of the plan's encoder on unlabelled images (issue 17).

``data``: find, plan and preprocess unlabelled images; ``methods``: the pretraining network
and the ``mae``, ``contrastive`` and ``genesis`` objectives; ``task``: the training task on
:class:`medseg.training.engine.Engine` and :func:`pretrain`, which leaves a model folder
for ``medseg train --init-from``.
"""

from medseg.pretraining.data import find_images, preprocess_images, unlabelled_fingerprint
from medseg.pretraining.methods import METHODS, PretrainNetwork
from medseg.pretraining.task import (
    PretrainConfig,
    PretrainResult,
    PretrainTask,
    build_pretrain_network,
    pretrain,
)

__all__ = [
    "METHODS",
    "PretrainConfig",
    "PretrainNetwork",
    "PretrainResult",
    "PretrainTask",
    "build_pretrain_network",
    "find_images",
    "preprocess_images",
    "pretrain",
    "unlabelled_fingerprint",
]
