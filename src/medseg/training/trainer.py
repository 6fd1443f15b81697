"""The training loop: one function, configured by a Plan and a TrainConfig."""

from __future__ import annotations

import math
import os
import queue
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medseg.losses import DeepSupervisionLoss, create_loss
from medseg.models import create_model
from medseg.models.sliding_window import sliding_window_logits
from medseg.planning.plan import Plan
from medseg.preprocessing.preprocess import LoadedCase, load_preprocessed
from medseg.progress import progress
from medseg.runtime import choose_device, configure_threads, memory_format
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training.config import TrainConfig
from medseg.training.logs import TrainingLog
from medseg.training.sampling import PatchSampler, region_size
from medseg.transforms.augment import BatchAugmenter

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"


@dataclass(frozen=True)
class TrainResult:
    fold_dir: str
    epochs: int
    iterations: int
    elapsed_seconds: float
    best_epoch: int
    best_val_dice: float
    best_val_dice_per_class: dict[str, float]
    iterations_per_second: float
    samples_per_second: float
    data_wait_share: float  # share of step time the network waited for a batch
    data_prep_seconds_per_batch: float  # CPU time to sample and augment one batch
    stopped_because: str


def build_model(
    plan: Plan, *, name: str | None = None, deep_supervision: bool = True, **options
) -> torch.nn.Module:
    """The plan's network (or the registered model ``name``); ``options`` go to its factory."""
    net = plan.network
    return create_model(
        name or net.name,
        ndim=plan.ndim,
        in_channels=plan.num_channels,
        num_classes=plan.num_classes,
        features=net.features,
        strides=net.strides,
        kernel_sizes=net.kernel_sizes,
        residual=net.residual,
        deep_supervision=deep_supervision and net.deep_supervision,
        **options,
    )


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class (NaN when absent from both)."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        if denom:
            out[c - 1] = 2.0 * np.logical_and(p, r).sum() / denom
    return out


def validate(
    model: torch.nn.Module,
    cases: list[LoadedCase],
    plan: Plan,
    device: torch.device,
    *,
    mirror: bool,
) -> np.ndarray:
    """Per-class Dice averaged over validation cases, predicted whole at preprocessed resolution."""
    scores = []
    for case in cases:
        logits = sliding_window_logits(
            model,
            torch.from_numpy(np.asarray(case.data)),
            patch_size=plan.patch_size,
            num_classes=plan.num_classes,
            mirror_axes=tuple(range(plan.ndim)) if mirror else (),
            device=device,
        )
        scores.append(
            dice_per_class(logits.argmax(0).numpy(), np.asarray(case.label), plan.num_classes)
        )
    with np.errstate(all="ignore"):
        return (
            np.nanmean(np.array(scores), axis=0)
            if scores
            else np.full(plan.num_classes - 1, np.nan)
        )


class _Prefetcher:
    """Prepares batches in a background thread so sampling overlaps the network step.

    With ``background=False`` batches are made on demand in the calling thread: on a
    CPU the network already uses every core, and two threads entering torch's
    OpenMP pool at once slow each other down far more than the few percent that
    batch preparation costs.
    """

    def __init__(self, make_batch, depth: int = 2, *, background: bool = True) -> None:
        self.make_batch, self.queue = make_batch, queue.Queue(maxsize=depth)
        self.stop, self.prep_seconds, self.count = threading.Event(), 0.0, 0
        self.error: BaseException | None = None
        self.background = background
        self.thread = threading.Thread(target=self._run, daemon=True)
        if background:
            self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                batch = self.make_batch()
                self.prep_seconds += time.perf_counter() - t
                self.count += 1
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced in the training thread
            self.error = exc

    def get(self):
        if not self.background:
            t = time.perf_counter()
            batch = self.make_batch()
            self.prep_seconds += time.perf_counter() - t
            self.count += 1
            return batch
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.queue.get(timeout=0.5)
            except queue.Empty:
                continue

    def close(self) -> None:
        self.stop.set()
        if self.background:
            self.thread.join(timeout=5)


@contextmanager
def _stop_on_signal(flag: threading.Event):
    """SIGTERM/SIGINT end training after the current iteration, with a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):  # noqa: ARG001
        if flag.is_set():  # second signal: give up at once
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt
        flag.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _learning_rate(config: TrainConfig, progress_fraction: float) -> float:
    lr0 = config.resolved_learning_rate()
    p = min(max(progress_fraction, 0.0), 1.0)
    if config.resolved_optimizer() == "sgd":
        return lr0 * (1 - p) ** 0.9
    if p < config.warmup_fraction:
        return lr0 * (p / config.warmup_fraction)
    q = (p - config.warmup_fraction) / max(1e-8, 1 - config.warmup_fraction)
    return lr0 * 0.5 * (1 + math.cos(math.pi * q))


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.resolved_learning_rate()
    optimizer = config.resolved_optimizer()
    if optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r} (use 'sgd' or 'adamw')")


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_fold(
    plan: Plan,
    preprocessed_dir: str | os.PathLike,
    fold_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    train_ids: list[str],
    val_ids: list[str],
    resume: bool = True,
    show_progress: bool = True,
    on_epoch=None,
) -> TrainResult:
    """Train one fold into ``fold_dir`` (checkpoints, logs, curves); resume from its last checkpoint.

    ``on_epoch(row) -> bool``, if given, sees each epoch's log row after the checkpoint
    is saved; returning True stops training (e.g. a pruned hyper-parameter trial).
    """
    from medseg.training.finetune import check_train_config

    check_train_config(config, plan)  # a bad configuration fails before any work
    # The log and train_config.json name the optimizer and rate actually used.
    config = replace(
        config,
        optimizer=config.resolved_optimizer(),
        learning_rate=config.resolved_learning_rate(),
    )
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config, fold_dir / "train_config.json")
    device = choose_device(config.device)
    configure_threads(device, config.num_threads)
    seed = config.seed + 1000 * config.fold
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

    train_cases = load_preprocessed(preprocessed_dir, train_ids)
    val_cases = (
        load_preprocessed(preprocessed_dir, val_ids[: config.max_validation_cases])
        if val_ids
        else []
    )
    fmt = memory_format(plan.ndim)
    options = {"encoder_weights": config.encoder_weights} if config.encoder_weights else {}
    model = build_model(
        plan, name=config.model, deep_supervision=config.deep_supervision, **options
    ).to(device)
    freeze: set[str] = set()
    if config.init_from:  # a resumed run overwrites these weights from its checkpoint below
        from medseg.training.finetune import frozen_names, load_matching_weights

        transfer = load_matching_weights(model, config.init_from)
        write_json_atomic(transfer, fold_dir / "init_from.json")
        freeze = frozen_names(transfer["loaded"], model) if config.freeze_epochs else set()
    model = model.to(memory_format=fmt)
    optimizer = _make_optimizer(model, config)
    weights = list(config.class_weights) if config.class_weights else None
    frequencies = None
    if config.class_weighting or config.class_sampling == "inverse_frequency":
        from medseg.losses.zoo import class_frequencies, class_weights_from_frequencies

        frequencies = class_frequencies([c.label for c in train_cases], plan.num_classes)
        if config.class_weighting and weights is None:
            weights = list(
                class_weights_from_frequencies(frequencies, scheme=config.class_weighting)
            )
    distiller = None
    if config.distill is not None:
        from medseg.distillation import make_distiller

        distiller = make_distiller(config.distill, plan, device, student=model)
        if distiller.adapters is not None:  # trained with the student, not saved with it
            optimizer.add_param_group({"params": list(distiller.adapters.parameters())})
    loss_fn = create_loss(config.loss, class_weights=weights).to(device)
    num_outputs = len(model.output_scales) if getattr(model, "deep_supervision", False) else 1
    criterion = DeepSupervisionLoss(loss_fn, num_outputs)
    use_amp = device.type == "cuda" and config.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    aug = config.augmentation
    spatial = aug.enabled and (
        aug.rotation_probability > 0 or aug.scale_probability > 0 or aug.elastic_probability > 0
    )
    batch_size = config.batch_size or plan.batch_size
    sampler = PatchSampler(
        train_cases,
        patch_size=plan.patch_size,
        region=region_size(plan.patch_size, spatial),
        batch_size=batch_size,
        foreground_fraction=plan.foreground_oversampling,
        seed=seed,
        class_sampling=config.class_sampling,
        class_frequencies=frequencies,
    )
    augmenter = BatchAugmenter(aug, patch_size=plan.patch_size, seed=seed)

    epoch, iteration, elapsed_before = 0, 0, 0.0
    best_dice, best_epoch, best_per_class = -1.0, -1, {}
    epochs_since_best = 0
    log_rows: list[dict] = []
    last_path = fold_dir / CHECKPOINT_LAST
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, iteration, elapsed_before = state["epoch"], state["iteration"], state["elapsed"]
        best_dice, best_epoch, best_per_class = (
            state["best_dice"],
            state["best_epoch"],
            state["best_per_class"],
        )
        epochs_since_best = state.get("epochs_since_best", 0)
        if distiller is not None and distiller.adapters is not None:
            distiller.adapters.load_state_dict(state["distill_adapters"])
        log_rows = state["log"]
        sampler.rng.bit_generator.state = state["sampler_rng"]
        augmenter.generator.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
    log = TrainingLog(fold_dir, log_rows)
    names = dict(plan.labels)
    class_names = {c: names.get(c, str(c)) for c in range(1, plan.num_classes)}

    def make_batch():
        images, labels = sampler.sample()
        x, y = augmenter(torch.from_numpy(images), torch.from_numpy(labels))
        return x.contiguous(memory_format=fmt), y

    budget = config.time_budget_minutes * 60 if config.time_budget_minutes else None
    total_iterations = config.max_epochs * config.iterations_per_epoch
    stop_flag = threading.Event()
    start = time.perf_counter()
    stopped_because = "max_epochs"
    step_seconds, wait_seconds, validation_seconds = 0.0, 0.0, 0.0
    session_iterations, last_step = 0, 0.0

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    prefetcher = _Prefetcher(make_batch, background=device.type == "cuda")
    try:
        with _stop_on_signal(stop_flag):
            while epoch < config.max_epochs:
                if freeze:  # fine-tuning: transferred layers wait for the new head
                    from medseg.training.finetune import set_frozen

                    set_frozen(model, freeze, frozen=epoch < config.freeze_epochs)
                model.train()
                losses = []
                epoch_step_seconds = 0.0
                bar = progress(
                    range(config.iterations_per_epoch),
                    total=config.iterations_per_epoch,
                    desc=f"epoch {epoch}",
                    enabled=show_progress,
                )
                out_of_time = False
                for _ in bar:
                    if (
                        budget is not None
                        and elapsed() + last_step + validation_seconds * 1.2 > budget
                    ):
                        out_of_time = True
                        break
                    if stop_flag.is_set():
                        break
                    t0 = time.perf_counter()
                    x, y = prefetcher.get()
                    t1 = time.perf_counter()
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    frac = iteration / total_iterations
                    if budget is not None:
                        frac = max(frac, elapsed() / budget)
                    for group in optimizer.param_groups:
                        group["lr"] = _learning_rate(config, frac)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, enabled=use_amp):
                        outputs = model(x)
                        loss = criterion(outputs, y)
                        if distiller is not None:
                            loss = distiller(loss, outputs, x)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                    scaler.step(optimizer)
                    scaler.update()
                    losses.append(float(loss.detach()))
                    t2 = time.perf_counter()
                    last_step = t2 - t0
                    wait_seconds += t1 - t0
                    step_seconds += t2 - t0
                    epoch_step_seconds += t2 - t0
                    iteration += 1
                    session_iterations += 1
                if not losses:
                    stopped_because = "time_budget" if out_of_time else "signal"
                    break
                t_val = time.perf_counter()
                model.eval()
                per_class = (
                    validate(model, val_cases, plan, device, mirror=config.mirror_validation)
                    if val_cases
                    else np.array([])
                )
                validation_seconds = time.perf_counter() - t_val
                with np.errstate(all="ignore"):
                    mean_dice = float(np.nanmean(per_class)) if per_class.size else float("nan")
                row = {
                    "epoch": epoch,
                    "iteration": iteration,
                    "elapsed_seconds": round(elapsed(), 2),
                    "learning_rate": optimizer.param_groups[0]["lr"],
                    "train_loss": float(np.mean(losses)),
                    "val_dice_mean": mean_dice,
                    **{f"val_dice_{class_names[c]}": float(v) for c, v in enumerate(per_class, 1)},
                    "iterations_per_second": round(len(losses) / max(epoch_step_seconds, 1e-9), 3),
                }
                if distiller is not None:
                    row["train_distill_kl"] = distiller.epoch_kl()
                    if distiller.adapters is not None:
                        row["train_distill_features"] = distiller.epoch_feature_loss()
                log.add(row)
                epoch += 1
                improved = not math.isnan(mean_dice) and mean_dice > best_dice
                if improved or not val_cases:
                    best_dice, best_epoch = (mean_dice if improved else best_dice), epoch - 1
                    best_per_class = {class_names[c]: float(v) for c, v in enumerate(per_class, 1)}
                    epochs_since_best = 0
                    _save_checkpoint(
                        fold_dir / CHECKPOINT_BEST,
                        {
                            "model": model.state_dict(),
                            "epoch": epoch - 1,
                            "val_dice": mean_dice,
                            "plan": to_jsonable(plan),
                        },
                    )
                else:
                    epochs_since_best += 1
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if use_amp else None,
                    "epoch": epoch,
                    "iteration": iteration,
                    "elapsed": elapsed(),
                    "best_dice": best_dice,
                    "best_epoch": best_epoch,
                    "best_per_class": best_per_class,
                    "epochs_since_best": epochs_since_best,
                    "distill_adapters": (
                        distiller.adapters.state_dict()
                        if distiller is not None and distiller.adapters is not None
                        else None
                    ),
                    "log": log.rows,
                    "sampler_rng": sampler.rng.bit_generator.state,
                    "augment_rng": augmenter.generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "plan": to_jsonable(plan),
                }
                _save_checkpoint(last_path, state)
                if out_of_time:
                    stopped_because = "time_budget"
                    break
                if stop_flag.is_set():
                    stopped_because = "signal"
                    break
                if on_epoch is not None and on_epoch(row):
                    stopped_because = "pruned"
                    break
                if (
                    config.early_stopping_patience
                    and epochs_since_best >= config.early_stopping_patience
                ):
                    stopped_because = "early_stopping"
                    break
                if budget is not None and elapsed() + validation_seconds + last_step * 2 > budget:
                    stopped_because = "time_budget"
                    break
    finally:
        prefetcher.close()
        log.close()
    prep = prefetcher.prep_seconds / max(prefetcher.count, 1)
    result = TrainResult(
        fold_dir=str(fold_dir),
        epochs=epoch,
        iterations=iteration,
        elapsed_seconds=round(elapsed(), 2),
        best_epoch=best_epoch,
        best_val_dice=best_dice,
        best_val_dice_per_class=best_per_class,
        iterations_per_second=round(session_iterations / max(step_seconds, 1e-9), 4),
        samples_per_second=round(session_iterations * batch_size / max(step_seconds, 1e-9), 3),
        data_wait_share=round(wait_seconds / max(step_seconds, 1e-9), 4),
        data_prep_seconds_per_batch=round(prep, 4),
        stopped_because=stopped_because,
    )
    write_json_atomic(result, fold_dir / "train_result.json")
    return result
