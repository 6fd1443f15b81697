"""Structured (channel) pruning of the plan's U-Net.

Every stage keeps the ``keep`` fraction of its channels with the largest filter L1 norms
(Li et al. 2017, "Pruning Filters for Efficient ConvNets"), separately for each
convolution's output: the inner and the outer channels of each encoder and decoder block
and the output of each upsampling. Every stage's width shrinks by the same factor, so the
result is again a plan U-Net (``features`` scaled) that the whole pipeline loads from
``plan.json`` alone: train (fine-tune with ``--init-from``), predict, export.

Pruning removes accuracy, and a short fine-tuning brings it back: the benchmark reports
Dice and speed before and after.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.model_folder import ModelFolder, write_weights
from medseg.models.unet import PlainBlock, UNet
from medseg.serialization import write_json_atomic

Index = torch.Tensor


def _strongest(weight: torch.Tensor, keep: int, out_dim: int = 0) -> Index:
    """Indices (sorted) of the ``keep`` output channels with the largest L1 norm."""
    moved = weight.transpose(0, out_dim) if out_dim else weight
    scores = moved.abs().flatten(1).sum(1)
    return torch.sort(torch.topk(scores, keep).indices).values


def _kept_width(width: int, keep: float) -> int:
    return max(1, int(round(width * keep)))


def _check_prunable(model: nn.Module) -> None:
    blocks = [*getattr(model, "encoder", []), *getattr(model, "decoder", [])]
    if (
        type(model) is not UNet
        or not blocks
        or not all(type(b) is PlainBlock for b in blocks)
        or hasattr(model, "gates")
    ):
        raise MedsegError(
            f"structured pruning supports the plain U-Net ('unet'); got {type(model).__name__} "
            "(residual, attention and other blocks tie channels together across layers)"
        )


def _slice_block(
    old: PlainBlock, new: PlainBlock, inputs: Index, inner: Index, outer: Index
) -> None:
    """Copy the kept channels of a two-layer block: conv(in->inner), norm, conv(inner->outer), norm."""
    for layer_old, layer_new, rows, cols in (
        (old[0], new[0], inner, inputs),
        (old[1], new[1], outer, inner),
    ):
        conv_old, norm_old = layer_old[0], layer_old[1]
        conv_new, norm_new = layer_new[0], layer_new[1]
        conv_new.weight.copy_(conv_old.weight[rows][:, cols])
        if conv_old.bias is not None:
            conv_new.bias.copy_(conv_old.bias[rows])
        for name, tensor in [*norm_old.named_parameters(), *norm_old.named_buffers()]:
            target = getattr(norm_new, name)
            target.copy_(tensor[rows] if tensor.ndim else tensor)


@torch.no_grad()
def prune_unet(model: UNet, keep: float) -> UNet:
    """A new U-Net with ``keep`` (0 < keep <= 1) of every stage's channels, weights copied.

    With ``keep=1`` the result computes exactly what ``model`` computes. Channels whose
    filters are all zero (norm affine zero too) contribute nothing, and are pruned first,
    so pruning them changes nothing either.
    """
    if not 0 < keep <= 1:
        raise MedsegError(f"keep must be in (0, 1], got {keep}")
    _check_prunable(model)
    encoder_widths = [block[1][0].out_channels for block in model.encoder]
    widths = [_kept_width(f, keep) for f in encoder_widths]
    first_conv = model.encoder[0][0][0]
    norm = (
        "batch"
        if isinstance(model.encoder[0][0][1], nn.modules.batchnorm._BatchNorm)
        else ("instance")
    )
    pruned = UNet(
        ndim=model.ndim,
        in_channels=first_conv.in_channels,
        num_classes=model.heads[0].out_channels,
        features=widths,
        strides=model.strides,
        kernel_sizes=[tuple(block[0][0].kernel_size) for block in model.encoder],
        deep_supervision=model.deep_supervision,
        norm=norm,
    )
    inputs = torch.arange(first_conv.in_channels)
    skips: list[Index] = []
    for old, new, width in zip(model.encoder, pruned.encoder, widths):
        inner = _strongest(old[0][0].weight, width)
        outer = _strongest(old[1][0].weight, width)
        _slice_block(old, new, inputs, inner, outer)
        skips.append(outer)
        inputs = outer
    x_channels = skips.pop()
    levels = range(len(widths) - 1, 0, -1)
    for i, level in enumerate(levels):
        width, skip = widths[level - 1], skips.pop()
        up_old, up_new = model.upsample[i], pruned.upsample[i]
        up = _strongest(up_old.weight, width, out_dim=1)  # ConvTranspose: (in, out, ...)
        up_new.weight.copy_(up_old.weight[x_channels][:, up])
        # The decoder sees cat(upsampled, skip): the skip's channels sit after the
        # upsampling's full width in the unpruned model.
        cat = torch.cat((up, skip + up_old.weight.shape[1]))
        dec_old, dec_new = model.decoder[i], pruned.decoder[i]
        inner = _strongest(dec_old[0][0].weight, width)
        outer = _strongest(dec_old[1][0].weight, width)
        _slice_block(dec_old, dec_new, cat, inner, outer)
        pruned.heads[i].weight.copy_(model.heads[i].weight[:, outer])
        pruned.heads[i].bias.copy_(model.heads[i].bias)
        x_channels = outer
    return pruned


def prune_model_dir(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    keep: float,
    overwrite: bool = False,
) -> dict:
    """Prune every fold of a trained U-Net model folder into a new model folder.

    The new folder has the plan with scaled ``features`` and the pruned weights as each
    fold's best weights (no last weights: nothing to resume), so ``medseg predict`` runs it
    and ``medseg train --plan OUT/plan.json --init-from OUT`` fine-tunes it. Returns
    parameter counts. Written to a temporary folder first, then moved into place.
    """
    folder = ModelFolder.open(model_dir)
    source, out, plan = folder.path, Path(output_dir), folder.plan
    if out.resolve() == source.resolve():
        raise MedsegError(f"{out}: the pruned model needs its own folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MedsegError(f"{out}: exists; pass --overwrite to replace it")
    folds = folder.select_folds(None, "best")
    names = {plan.network.name} | {folder.network_name(fold) for fold in folds}
    if names != {"unet"}:
        raise MedsegError(
            f"{source}: structured pruning supports the plain U-Net ('unet'), this model "
            f"folder holds {', '.join(sorted(names))}"
        )
    networks = folder.load_networks(folds, kind="best", device="cpu", fuse_batchnorm=False)
    pruned = [prune_unet(net.to(memory_format=torch.contiguous_format), keep) for net in networks]
    widths = tuple(block[1][0].out_channels for block in pruned[0].encoder)
    new_plan = replace(plan, network=replace(plan.network, features=widths))
    staging = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_json_atomic(new_plan, staging / "plan.json")
    for name in ("splits.json", "dataset.json"):
        if (source / name).exists():
            shutil.copyfile(source / name, staging / name)
    for fold, net in zip(folds, pruned):
        fold_dir = staging / f"fold_{fold}"
        fold_dir.mkdir()
        write_weights(
            fold_dir,
            "best",
            net.state_dict(),
            metadata={"network": "unet", "pruned_keep": keep},
        )
        config = folder.fold_dir(fold) / "train_config.json"
        if config.exists():
            shutil.copyfile(config, fold_dir / "train_config.json")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {
        "source": str(source),
        "keep": keep,
        "features_before": list(plan.network.features),
        "features_after": list(widths),
        "parameters_before": count(networks[0]),
        "parameters_after": count(pruned[0]),
        "folds": folds,
    }
    write_json_atomic(report, staging / "prune_report.json")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return report
