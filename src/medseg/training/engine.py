"""The training engine: one loop for every way medseg trains a network.

The loop owns what every regime shares: device and threads, precision (CUDA AMP),
optimizer and learning-rate schedule, the time budget, checkpoint and resume (model,
optimizer, scaler and every random state), SIGTERM/SIGINT, validation once per epoch,
the training log (CSV, TensorBoard, curve PNG), the progress bar and the best/last
weights (written through :func:`medseg.model_folder.write_weights`).

What varies is a :class:`TrainingTask` (its data, the loss of one batch, its validation
metric, the random state it must carry across a resume) and optional :class:`Hook`
objects called at fixed points of the loop:

=================  =======================================================================
``on_start``       after the network and optimizer exist (add parameters to the optimizer,
                   load a teacher, join a process group)
``wrap_model``     wrap the network used for the training forward pass (data parallel)
``loss``           change a batch's loss (a teacher's soft labels, a regularizer on old
                   outputs for continual learning)
``on_gradients``   after backward and unscaling, before clipping and the optimizer step
``after_step``     after every optimizer step, with the step's loss
``row``            extra columns of the epoch's log row
``on_epoch_end``   after the epoch's checkpoint: return a reason to stop (pruning, a
                   round boundary)
``agree``          values every process of a data-parallel run must share (elapsed time,
                   stop flags): one process returns them as they are
``state_dict``     hook state saved in the resumable checkpoint (``load_state_dict`` back);
                   called in every process, so a data-parallel hook may gather
=================  =======================================================================

Segmentation (:mod:`medseg.training.segmentation`), knowledge distillation (a hook from
:mod:`medseg.distillation`) and learned registration (:mod:`medseg.registration.learned`)
all run on :class:`Engine`. A federated client round is ``Engine(...).fit(initial_weights=w)``
with ``LoopConfig.max_steps``; its result carries the trained network.
"""

from __future__ import annotations

import math
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.imaging import atomic_path
from medseg.model_folder import write_weights
from medseg.progress import progress
from medseg.runtime import choose_device, configure_threads
from medseg.serialization import write_json_atomic
from medseg.training.logs import TrainingLog
from medseg.training.precision import choose_speed

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_FORMAT = 1
ENGINE_OPTIMIZERS = ("sgd", "adamw", "adam")


@dataclass(frozen=True)
class LoopConfig:
    """How the engine trains: steps, stopping rules, optimizer, schedule and runtime.

    Parameters
    ----------
    iterations_per_epoch
        Optimizer steps between two validations (one epoch).
    max_epochs
        Epochs to train in all (a resumed run counts the epochs already done).
    max_steps
        Stop once this many steps are done in all (``None``: no limit); a federated client
        round, for example. The epoch in progress is then validated and checkpointed.
    time_budget_minutes
        Wall-clock budget; training stops in time to validate and checkpoint within it,
        and the schedule progresses by the share of the budget spent when that is ahead
        of the share of steps done.
    early_stopping_patience
        Stop after this many epochs without a better validation score (``None``: never).
    optimizer
        ``"sgd"`` (Nesterov momentum, poly decay), ``"adamw"`` or ``"adam"`` (both with
        linear warm-up and cosine decay).
    learning_rate, weight_decay, momentum, warmup_fraction
        Optimizer and schedule settings (``momentum``: SGD only; ``warmup_fraction``:
        Adam(W) only).
    grad_clip
        Maximum gradient norm of the network's parameters (``None``: no clipping).
    amp
        Mixed precision (float16 autocast and a gradient scaler) on CUDA.
    precision
        On CPU: ``"fp32"``, ``"bf16"`` (bfloat16 autocast) or ``"auto"`` (bfloat16 only
        where the CPU has native bfloat16 and a timing probe of the first batch finds it
        faster; see :mod:`medseg.training.precision`).
    compile
        ``"off"``, ``"on"`` or ``"auto"`` (runs of 10 minutes or more, where a C++ compiler
        is present): the probe also times the ``torch.compile``-d training step and keeps
        it only if it is faster (a network that fails to compile trains eagerly).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    num_threads
        CPU threads (``None``: the cores this process may use).
    seed
        Seeds Python's, NumPy's and torch's global generators before the task is set up.
    tensorboard
        Also write TensorBoard scalars beside ``log.csv``.
    """

    iterations_per_epoch: int = 100
    max_epochs: int = 1000
    max_steps: int | None = None
    time_budget_minutes: float | None = None
    early_stopping_patience: int | None = None
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    weight_decay: float = 3e-5
    momentum: float = 0.99
    warmup_fraction: float = 0.05
    grad_clip: float | None = 12.0
    amp: bool = True
    precision: str = "fp32"
    compile: str = "off"
    device: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    tensorboard: bool = True


@dataclass(frozen=True)
class Validation:
    """One epoch's validation.

    Parameters
    ----------
    score
        Higher is better; it picks the best weights (NaN: no score this epoch).
    columns
        Columns of the epoch's log row (e.g. ``val_dice_mean`` and one per class).
    details
        Kept with the best epoch and returned in :class:`LoopResult` (e.g. Dice per class).
    """

    score: float
    columns: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoopResult:
    """What a call of :meth:`Engine.fit` did (timings of this call, counts in all)."""

    folder: str
    epochs: int
    iterations: int
    elapsed_seconds: float
    best_epoch: int
    best_score: float | None  # None: no epoch has scored yet
    best_details: dict[str, float]
    session_iterations: int
    step_seconds: float
    iterations_per_second: float
    samples_per_second: float
    data_wait_share: float  # share of step time spent waiting for a batch
    data_prep_seconds_per_batch: float  # time to make one batch (sample, augment)
    stopped_because: str
    model: nn.Module = field(repr=False, compare=False)  # the trained network
    precision: str = "fp32"  # what the steps computed in ("bf16": CPU bfloat16 autocast)


class TrainingTask:
    """What a training step is: data, the loss of a batch, validation, extra random state.

    Subclasses set :attr:`batch_size` and :attr:`has_validation` and implement
    :meth:`setup`, :meth:`make_batch`, :meth:`forward_loss` and :meth:`validate`; the
    other methods have working defaults.
    """

    batch_size: int = 1
    has_validation: bool = False  # False: every epoch's weights count as the best

    def setup(self, device: torch.device) -> nn.Module:
        """Load the data and build the network on ``device`` (after the engine seeded).

        Returns
        -------
        torch.nn.Module
            The network to train.
        """
        raise NotImplementedError

    def make_batch(self) -> Any:
        """One training batch on the CPU (may run in a background thread on CUDA)."""
        raise NotImplementedError

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """``batch`` moved to ``device`` (default: every tensor of a tuple/list)."""
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.to_device(b, device) for b in batch)
        return batch

    def forward_loss(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        """The outputs of ``model`` on ``batch`` and their loss (under autocast on CUDA)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, model: nn.Module) -> None:
        """Called before each epoch (e.g. to freeze or unfreeze layers)."""

    def validate(self, model: nn.Module) -> Validation:
        """Score ``model`` (in eval mode) on the validation data."""
        raise NotImplementedError

    def weights_metadata(self, epoch: int, score: float) -> dict[str, Any]:
        """Plain-JSON metadata written beside the weights of ``epoch``."""
        return {"epoch": epoch, "score": score}

    def state_dict(self) -> dict[str, Any]:
        """Random state to carry across a resume (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def shard(
        self, *, rank: int, world: int, batch: slice, gather: Callable[[list[Any]], list[Any]]
    ) -> bool:
        """Take ``rank``'s share of a data-parallel run of ``world`` processes (after
        :meth:`setup`).

        A task that shards makes only the ``batch`` slice of the global batch that one
        process would make from the same random stream, gives ranks other than 0 their own
        augmentation stream, validates its share of the cases and combines per-case
        results with ``gather`` (every rank's list, concatenated). The default does not
        shard: every rank then trains on its own full batch and validates every case.

        Returns
        -------
        bool
            Whether the task sharded.
        """
        return False


class Hook:
    """A plug-in at fixed points of the loop; every method is optional (see the module).

    ``name`` keys the hook's state in the checkpoint: hooks of one run need distinct names.
    """

    name: str = "hook"

    def on_start(self, engine: Engine) -> None:
        """The network, optimizer and scaler exist; the checkpoint is not loaded yet."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module for the training forward pass (default: ``model`` itself)."""
        return model

    def loss(self, outputs: Any, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimize, from the task's ``loss`` of ``outputs`` on ``batch``."""
        return loss

    def on_gradients(self, engine: Engine) -> None:
        """Gradients are computed and unscaled; clipping and the step come next."""

    def after_step(self, engine: Engine, loss: float) -> None:
        """After every optimizer step (``engine.iteration`` counts it already)."""

    def row(self, engine: Engine) -> dict[str, float]:
        """Extra columns of the epoch's log row."""
        return {}

    def on_epoch_end(self, engine: Engine, row: dict[str, Any]) -> str | bool | None:
        """After the epoch's checkpoint; a reason (or True) stops training."""
        return None

    def agree(self, engine: Engine, values: dict[str, float]) -> dict[str, float]:
        """``values`` as every process must see them (data parallel: the maximum over the
        ranks of the elapsed time and of each stop flag, so no rank stops alone)."""
        return values

    def state_dict(self) -> dict[str, Any]:
        """Hook state saved in the resumable checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def learning_rate(config: LoopConfig, progress_fraction: float) -> float:
    """The learning rate when ``progress_fraction`` of the training is done.

    SGD: poly decay ``lr (1 - p)^0.9``; Adam(W): linear warm-up over ``warmup_fraction``,
    then cosine decay to zero.
    """
    lr0 = config.learning_rate
    p = min(max(progress_fraction, 0.0), 1.0)
    if config.optimizer == "sgd":
        return lr0 * (1 - p) ** 0.9
    if p < config.warmup_fraction:
        return lr0 * (p / config.warmup_fraction)
    q = (p - config.warmup_fraction) / max(1e-8, 1 - config.warmup_fraction)
    return lr0 * 0.5 * (1 + math.cos(math.pi * q))


def make_optimizer(model: nn.Module, config: LoopConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``model``'s parameters (one parameter group)."""
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r} (use {', '.join(ENGINE_OPTIMIZERS)})")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def stop_on_signal(flag: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``flag`` (training ends after the current step, with a checkpoint);
    a second signal raises :class:`KeyboardInterrupt` at once. Only in the main thread."""
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


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A resumable checkpoint, read with ``weights_only=True`` onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


class _Prefetcher:
    """Prepares batches in a background thread so sampling overlaps the network step.

    With ``background=False`` batches are made on demand in the calling thread: on a
    CPU the network already uses every core, and two threads entering torch's
    OpenMP pool at once slow each other down far more than the few percent that
    batch preparation costs.
    """

    def __init__(self, make_batch: Callable[[], Any], depth: int = 2, *, background: bool) -> None:
        self.make_batch, self.queue = make_batch, queue.Queue(maxsize=depth)
        self.stop, self.prep_seconds, self.count = threading.Event(), 0.0, 0
        self.error: BaseException | None = None
        self.pending: list[Any] = []  # batches to hand out before new ones (the probe's)
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

    def get(self) -> Any:
        if self.pending:
            return self.pending.pop(0)
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


class Engine:
    """Trains a task's network into ``folder``; resumes from its ``checkpoint_last.pt``.

    Parameters
    ----------
    task
        What a step is (see :class:`TrainingTask`).
    folder
        Where the checkpoint, the weights (``weights_best``/``weights_last``) and the
        logs go (created if missing).
    config
        How to train (see :class:`LoopConfig`).
    hooks
        Plug-ins called at fixed points of the loop (see :class:`Hook`), in order.
    resume
        Continue from ``folder/checkpoint_last.pt`` when it exists.
    show_progress
        A progress bar per epoch.

    Notes
    -----
    During :meth:`fit` hooks may read ``device``, ``model`` (the network, unwrapped),
    ``train_model`` (what the forward pass calls), ``optimizer``, ``scaler``,
    ``use_amp``, ``epoch``, ``iteration`` and ``task``; a hook may set
    ``main_process = False`` (another rank of a data-parallel run: no files, no bar)
    and call :meth:`request_stop`.
    """

    device: torch.device
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    precision: str = "fp32"  # resolved at the start of fit(): "fp32", "bf16" or CUDA's

    def __init__(
        self,
        task: TrainingTask,
        folder: str | Path,
        config: LoopConfig,
        *,
        hooks: Sequence[Hook] = (),
        resume: bool = True,
        show_progress: bool = True,
    ) -> None:
        names = [h.name for h in hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"hooks need distinct names, got {names}")
        if config.optimizer not in ENGINE_OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {config.optimizer!r} (use {', '.join(ENGINE_OPTIMIZERS)})"
            )
        self.task, self.folder, self.config = task, Path(folder), config
        self.hooks = list(hooks)
        self.resume, self.show_progress = resume, show_progress
        self.main_process = True
        self.epoch, self.iteration = 0, 0
        self._stop = threading.Event()
        self._stop_reason = "signal"

    def request_stop(self, reason: str = "signal") -> None:
        """End training after the current step (with a checkpoint), as a signal does."""
        self._stop_reason = reason
        self._stop.set()

    # ------------------------------------------------------------------ set-up and resume

    def _prepare(self, initial_weights: Mapping[str, torch.Tensor] | None) -> None:
        cfg = self.config
        self.device = choose_device(cfg.device)
        configure_threads(self.device, cfg.num_threads)
        seed_everything(cfg.seed)
        self.model = self.task.setup(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.use_amp = self.device.type == "cuda" and cfg.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        for hook in self.hooks:
            hook.on_start(self)
        if initial_weights is not None:
            self.model.load_state_dict(initial_weights)
        self.train_model = self.model
        for hook in self.hooks:
            self.train_model = hook.wrap_model(self.train_model)

    def _resume_state(self) -> dict[str, Any] | None:
        path = self.folder / CHECKPOINT_LAST
        if not (self.resume and path.exists()):
            return None
        state = load_checkpoint(path)
        if "format" not in state:  # written before the engine: same content, older keys
            adapters = state.get("distill_adapters")
            state = {
                **state,
                "best_score": state.get("best_dice", state.get("best")),
                "best_details": state.get("best_per_class", {}),
                "task": state,
                "hooks": {"distill": {"adapters": adapters}} if adapters else {},
            }
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.use_amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.task.load_state_dict(state.get("task") or {})
        if state.get("torch_rng") is not None:  # (earlier registration checkpoints lack it)
            torch.set_rng_state(state["torch_rng"])
        hook_states = state.get("hooks") or {}
        for hook in self.hooks:  # after the task's and torch's state: a hook may refine them
            if hook.name in hook_states:
                hook.load_state_dict(hook_states[hook.name])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        return state

    def _agree(self, values: dict[str, float]) -> dict[str, float]:
        for hook in self.hooks:
            values = hook.agree(self, values)
        return values

    def _checkpoint_state(
        self,
        elapsed: float,
        best: dict[str, Any],
        rows: list,
        hook_states: dict[str, Any] | None = None,
    ) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "elapsed": elapsed,
            **best,
            "log": rows,
            "torch_rng": torch.get_rng_state(),
            "task": self.task.state_dict(),
            "hooks": (
                hook_states
                if hook_states is not None
                else {h.name: h.state_dict() for h in self.hooks}
            ),
        }

    # ------------------------------------------------------------------ one step

    def _autocast(self, *, bf16: bool | None = None) -> torch.autocast:
        """CUDA: float16 AMP when ``use_amp``; CPU: bfloat16 when the run chose it."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", enabled=self.use_amp)
        bf16 = self.precision == "bf16" if bf16 is None else bf16
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def _choose_speed(self, prefetcher: _Prefetcher, expected_seconds: float | None) -> None:
        """Resolve ``config.precision`` and ``config.compile`` for this run.

        The probe times passes on the first batch, which training then uses as its first:
        the random streams and the weights stay those of a run without a probe.
        """
        cfg = self.config
        probe_batch: list[Any] = []
        saved: dict[str, Any] = {}  # what the probe's passes change, kept only if it runs
        compiled_model: list[nn.Module] = []

        def probe_step(compiled: bool, bf16: bool) -> None:
            if not probe_batch:
                saved["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                saved["rng"] = torch.get_rng_state()
                probe_batch.append(prefetcher.get())
            if compiled and not compiled_model:
                compiled_model.append(torch.compile(self.model))
            model = compiled_model[0] if compiled else self.model
            batch = self.task.to_device(probe_batch[0], self.device)
            self.model.train()  # unwrapped: a data-parallel probe must not all-reduce
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast(bf16=bf16):
                _, loss = self.task.forward_loss(model, batch)
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)

        choice = choose_speed(
            cfg.precision,
            compile_setting=cfg.compile,
            device=self.device,
            amp=cfg.amp,
            expected_run_seconds=expected_seconds,
            step=probe_step,
            can_compile=self.train_model is self.model,
        )
        if probe_batch:  # undo what the passes changed (norm statistics, RNG)
            self.model.load_state_dict(saved["model"])
            torch.set_rng_state(saved["rng"])
            prefetcher.pending.extend(probe_batch)
        # every rank of a data-parallel run computes alike: bf16 only if all chose it
        use_bf16 = choice.precision == "bf16"
        if self._agree({"fp32": float(not use_bf16)})["fp32"]:
            use_bf16 = False
        cpu_mode = "bf16" if use_bf16 else "fp32"
        self.precision = cpu_mode if self.device.type == "cpu" else choice.precision
        if choice.compiled:
            self.train_model = compiled_model[0]
        if self.main_process:
            record = {**choice.to_json(), "precision": self.precision}
            write_json_atomic(record, self.folder / "precision.json")
            if choice.step_seconds:
                print(
                    f"medseg: training in {self.precision}"
                    f"{', compiled' if choice.compiled else ''} ({choice.reason}"
                    f"{'' if choice.reason.startswith('probe') else '; ' + choice.compile_reason})",
                    file=sys.stderr,
                )

    def _step(self, batch: Any) -> float:
        """Forward, loss (through the hooks), backward and the optimizer step."""
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs, loss = self.task.forward_loss(self.train_model, batch)
            for hook in self.hooks:
                loss = hook.loss(outputs, batch, loss)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        for hook in self.hooks:
            hook.on_gradients(self)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    # ------------------------------------------------------------------ the loop

    def fit(self, *, initial_weights: Mapping[str, torch.Tensor] | None = None) -> LoopResult:
        """Train until a stopping rule holds; returns what happened and the network.

        Parameters
        ----------
        initial_weights
            A state dict to start from (a federated round's global weights); a resumed
            checkpoint overrides it.

        Returns
        -------
        LoopResult
            ``stopped_because`` is ``"max_epochs"``, ``"max_steps"``, ``"time_budget"``,
            ``"early_stopping"``, ``"signal"`` or a hook's reason.
        """
        cfg, task = self.config, self.task
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prepare(initial_weights)
        state = self._resume_state()
        best: dict[str, Any] = {
            "best_score": None,
            "best_epoch": -1,
            "best_details": {},
            "epochs_since_best": 0,
        }
        elapsed_before = 0.0
        if state is not None:
            best = {k: state.get(k, best[k]) for k in best}
            elapsed_before = state["elapsed"]
        log = TrainingLog(
            self.folder,
            state["log"] if state is not None else [],
            tensorboard=cfg.tensorboard and self.main_process,
        )
        del state

        budget = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
        total_iterations = cfg.max_epochs * cfg.iterations_per_epoch
        start = time.perf_counter()
        stopped_because = "max_epochs"
        step_seconds, wait_seconds, validation_seconds = 0.0, 0.0, 0.0
        session_iterations, last_step = 0, 0.0

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - start

        def at_step_limit() -> bool:
            return cfg.max_steps is not None and self.iteration >= cfg.max_steps

        prefetcher = _Prefetcher(task.make_batch, background=self.device.type == "cuda")
        steps_left = total_iterations - self.iteration
        if cfg.max_steps is not None:
            steps_left = min(steps_left, cfg.max_steps - self.iteration)
        expected = 0.05 * max(steps_left, 0)  # ~0.05 s is a small CPU step: a rough floor
        if budget is not None:
            expected = min(expected, budget - elapsed_before)
        try:
            self._choose_speed(prefetcher, expected)
            with stop_on_signal(self._stop):
                while self.epoch < cfg.max_epochs:
                    task.start_epoch(self.epoch, self.model)
                    self.train_model.train()
                    losses: list[float] = []
                    epoch_step_seconds = 0.0
                    bar = progress(
                        range(cfg.iterations_per_epoch),
                        total=cfg.iterations_per_epoch,
                        desc=f"epoch {self.epoch}",
                        enabled=self.show_progress and self.main_process,
                    )
                    out_of_time = False
                    for _ in bar:
                        # one decision for every rank of a data-parallel run (hooks agree)
                        shared = self._agree(
                            {
                                "elapsed": elapsed(),
                                "out_of_time": float(
                                    budget is not None
                                    and elapsed() + last_step + validation_seconds * 1.2 > budget
                                ),
                                "stop": float(self._stop.is_set()),
                            }
                        )
                        if shared["out_of_time"]:
                            out_of_time = True
                            break
                        if shared["stop"] and not self._stop.is_set():
                            self.request_stop()  # another rank was told to stop
                        if self._stop.is_set() or at_step_limit():
                            break
                        t0 = time.perf_counter()
                        batch = prefetcher.get()
                        t1 = time.perf_counter()
                        batch = task.to_device(batch, self.device)
                        fraction = self.iteration / total_iterations
                        if budget is not None:  # the agreed time: every rank the same rate
                            fraction = max(fraction, shared["elapsed"] / budget)
                        for group in self.optimizer.param_groups:
                            group["lr"] = learning_rate(cfg, fraction)
                        losses.append(self._step(batch))
                        t2 = time.perf_counter()
                        last_step = t2 - t0
                        wait_seconds += t1 - t0
                        step_seconds += t2 - t0
                        epoch_step_seconds += t2 - t0
                        self.iteration += 1
                        session_iterations += 1
                        for hook in self.hooks:
                            hook.after_step(self, losses[-1])
                    if not losses:
                        if out_of_time:
                            stopped_because = "time_budget"
                        elif at_step_limit() and not self._stop.is_set():
                            stopped_because = "max_steps"
                        else:
                            stopped_because = self._stop_reason
                        break

                    t_val = time.perf_counter()
                    self.model.eval()
                    validation = task.validate(self.model)
                    validation_seconds = time.perf_counter() - t_val
                    row = {
                        "epoch": self.epoch,
                        "iteration": self.iteration,
                        "elapsed_seconds": round(elapsed(), 2),
                        "learning_rate": self.optimizer.param_groups[0]["lr"],
                        "train_loss": float(np.mean(losses)),
                        **validation.columns,
                        "iterations_per_second": round(
                            len(losses) / max(epoch_step_seconds, 1e-9), 3
                        ),
                    }
                    for hook in self.hooks:
                        row.update(hook.row(self))
                    if self.main_process:
                        log.add(row)
                    else:
                        log.rows.append(row)
                    self.epoch += 1
                    score = validation.score
                    improved = not math.isnan(score) and (
                        best["best_score"] is None or score > best["best_score"]
                    )
                    if improved or not task.has_validation:
                        if improved:
                            best["best_score"] = score
                        best["best_epoch"] = self.epoch - 1
                        best["best_details"] = dict(validation.details)
                        best["epochs_since_best"] = 0
                        if self.main_process:
                            write_weights(
                                self.folder,
                                "best",
                                self.model.state_dict(),
                                metadata=task.weights_metadata(self.epoch - 1, score),
                            )
                    else:
                        best["epochs_since_best"] += 1
                    hook_states = {h.name: h.state_dict() for h in self.hooks}  # every rank
                    if self.main_process:
                        # weights_last follows the checkpoint, so `--checkpoint last` after
                        # a kill predicts with the weights a resume would continue from
                        write_weights(
                            self.folder,
                            "last",
                            self.model.state_dict(),
                            metadata=task.weights_metadata(self.epoch - 1, score),
                        )
                        save_checkpoint(
                            self.folder / CHECKPOINT_LAST,
                            self._checkpoint_state(elapsed(), best, log.rows, hook_states),
                        )

                    if out_of_time:
                        stopped_because = "time_budget"
                        break
                    shared = self._agree(
                        {
                            "stop": float(self._stop.is_set()),
                            "out_of_time": float(
                                budget is not None
                                and elapsed() + validation_seconds + last_step * 2 > budget
                            ),
                        }
                    )
                    if shared["stop"] and not self._stop.is_set():
                        self.request_stop()
                    if self._stop.is_set():
                        stopped_because = self._stop_reason
                        break
                    reasons = [hook.on_epoch_end(self, row) for hook in self.hooks]
                    reason = next((r for r in reasons if r), None)
                    if self._agree({"hook": float(bool(reason))})["hook"]:
                        stopped_because = (reason if isinstance(reason, str) else "hook") or "hook"
                        break
                    if at_step_limit():
                        stopped_because = "max_steps"
                        break
                    if (
                        cfg.early_stopping_patience
                        and best["epochs_since_best"] >= cfg.early_stopping_patience
                    ):
                        stopped_because = "early_stopping"
                        break
                    if shared["out_of_time"]:
                        stopped_because = "time_budget"
                        break
        finally:
            prefetcher.close()
            log.close()
        return LoopResult(
            folder=str(self.folder),
            epochs=self.epoch,
            iterations=self.iteration,
            elapsed_seconds=elapsed(),
            best_epoch=best["best_epoch"],
            best_score=best["best_score"],
            best_details=best["best_details"],
            session_iterations=session_iterations,
            step_seconds=step_seconds,
            iterations_per_second=session_iterations / max(step_seconds, 1e-9),
            samples_per_second=session_iterations * task.batch_size / max(step_seconds, 1e-9),
            data_wait_share=wait_seconds / max(step_seconds, 1e-9),
            data_prep_seconds_per_batch=prefetcher.prep_seconds / max(prefetcher.count, 1),
            stopped_because=stopped_because,
            model=self.model,
            precision=self.precision,
        )
