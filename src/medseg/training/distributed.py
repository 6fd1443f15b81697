"""Data-parallel training on :class:`medseg.training.engine.Engine` with ``torch.distributed``.

A run of ``N`` ranks trains one network as one process with the whole batch would:

- the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or :func:`launch` starts ``N``
  processes on this machine with that environment; gloo on the CPU, NCCL on GPUs;
- the task's batch size is the global batch: each rank makes its slice of the batch that
  one process would draw from the same seeded stream (:meth:`TrainingTask.shard`),
  DistributedDataParallel averages the gradients, and the loss of an uneven slice is
  scaled so that the average is the mean over the whole batch;
- only rank 0 writes the checkpoint, the weights and the logs; validation is split across
  the ranks and the per-case scores are gathered;
- the ranks agree every step on the elapsed time and on stopping (time budget, a signal),
  so no rank stops alone and every rank uses the same learning rate;
- the checkpoint keeps every rank's random state, so a resume continues each stream;
- a rank that dies or stops answering makes the others fail with
  :class:`DistributedError` within the process group's timeout instead of hanging;
- threads per rank: ``cores // ranks on this node`` unless given, or torchrun's
  ``OMP_NUM_THREADS`` (1 by default); the choice is printed and written to
  ``data_parallel.json``.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medseg.errors import MedsegError
from medseg.imaging import atomic_path
from medseg.runtime import usable_cores
from medseg.training.engine import Engine, Hook

TIMEOUT_ENV = "MEDSEG_DIST_TIMEOUT"  # seconds a collective may wait for a silent rank
DEFAULT_TIMEOUT_SECONDS = 300.0
HOOK_NAME = "data_parallel"


class DistributedError(MedsegError):
    """A rank of a data-parallel run failed, died or stopped answering."""


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in a data-parallel run (torchrun's environment variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv | None:
    """This process's place in a run started by torchrun or :func:`launch` (``None``: alone)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        return RankEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    except ValueError as exc:
        raise DistributedError(f"bad torchrun environment variable: {exc}") from None


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """How long a collective waits for a silent rank (``MEDSEG_DIST_TIMEOUT``, default 300 s)."""
    env = os.environ if environ is None else environ
    try:
        return float(env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS))
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={env[TIMEOUT_ENV]!r} is not a number") from None


def threads_per_rank(
    env: RankEnv, requested: int | None = None, environ: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """CPU threads for each rank and the sentence that explains the choice.

    ``requested`` wins; else ``OMP_NUM_THREADS`` (torchrun sets 1 when it is unset);
    else the usable cores divided by the ranks on this node, so ranks x threads = cores.
    """
    environ = os.environ if environ is None else environ
    if requested:
        return requested, f"{requested} thread(s) per rank (as asked)"
    if "OMP_NUM_THREADS" in environ and "MEDSEG_LAUNCHED" not in environ:
        try:
            n = max(1, int(environ["OMP_NUM_THREADS"]))
        except ValueError:
            n = 1
        note = " (torchrun's default when OMP_NUM_THREADS is unset)" if n == 1 else ""
        return n, f"{n} thread(s) per rank from OMP_NUM_THREADS={n}{note}; pass --threads to change"
    cores = usable_cores()
    n = max(1, cores // max(env.local_world_size, 1))
    return n, f"{n} thread(s) per rank ({cores} cores / {env.local_world_size} ranks on this node)"


def rank_device(env: RankEnv, device: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for "auto"/"cuda" with GPUs, else ``device``."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{env.local_rank % torch.cuda.device_count()}"
    return "cpu" if device == "auto" else device


def join_process_group(env: RankEnv, *, device: str = "auto") -> str:
    """Join (once) the process group of ``env``; returns the backend (gloo or NCCL).

    Every collective then fails after :func:`timeout_seconds` instead of waiting forever.
    """
    if dist.is_initialized():
        return dist.get_backend()
    backend = "nccl" if rank_device(env, device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(rank_device(env, device).split(":")[1]))
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_seconds()),
        )
    except (RuntimeError, dist.DistError) as exc:
        raise DistributedError(
            f"rank {env.rank} of {env.world_size}: could not join the process group at "
            f"{env.master_addr}:{env.master_port} ({first_line(exc)})"
        ) from None
    return backend


def leave_process_group() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's are long)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a collective whose peer died, hung or left."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        key in text
        for key in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
    )


@contextmanager
def peer_failures(env: RankEnv | None) -> Iterator[None]:
    """Turn a failed collective (a rank died or hung) into a one-line :class:`DistributedError`."""
    if env is None:
        yield
        return
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if not is_collective_failure(exc):
            raise
        raise DistributedError(
            f"rank {env.rank} of {env.world_size}: another rank died or stopped answering "
            f"({first_line(exc)}); stopping this rank too (the last checkpoint is kept)"
        ) from None


@contextmanager
def main_first(env: RankEnv | None) -> Iterator[None]:
    """Rank 0 runs the block first (planning, preprocessing); the others then find it cached."""
    if env is None or not dist.is_initialized():
        yield
        return
    with peer_failures(env):
        # preprocessing a large data set may take hours: a barrier of its own, without the
        # short timeout (a rank that dies still ends it at once: its sockets close)
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))
        if not env.main:
            dist.barrier(group=group)
        yield
        if env.main:
            dist.barrier(group=group)


def batch_share(global_batch: int, rank: int, world: int) -> slice:
    """The slice of a global batch that ``rank`` makes (sizes differ by at most one)."""
    if global_batch < world:
        raise DistributedError(
            f"batch size {global_batch} is smaller than the {world} ranks: every rank needs a patch"
        )
    base, extra = divmod(global_batch, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank ``rank``'s own streams (rank 0 keeps ``seed``: one process = rank 0)."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order (the list itself when alone)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


class DataParallelHook(Hook):
    """Makes an :class:`Engine` run one rank of a data-parallel run (see the module).

    Parameters
    ----------
    env
        This process's place in the run; the process group must be joined
        (:func:`join_process_group`).
    threads
        CPU threads of this rank (``None``: keep the engine's setting).
    note
        A sentence for the log about the threads (from :func:`threads_per_rank`).
    """

    name = HOOK_NAME

    def __init__(self, env: RankEnv, *, threads: int | None = None, note: str = "") -> None:
        self.env, self.threads, self.note = env, threads, note
        self.sharded, self.loss_scale = False, 1.0

    def on_start(self, engine: Engine) -> None:
        env = self.env
        if not dist.is_initialized():
            raise DistributedError("DataParallelHook needs a joined process group")
        engine.main_process = env.main
        if self.threads and engine.device.type == "cpu":
            torch.set_num_threads(self.threads)
        share = batch_share(engine.task.batch_size, env.rank, env.world_size)
        self.sharded = engine.task.shard(
            rank=env.rank, world=env.world_size, batch=share, gather=gather_lists
        )
        # DDP averages over ranks; an uneven slice weighs its mean by its share of the batch
        size = share.stop - share.start
        self.loss_scale = size * env.world_size / engine.task.batch_size if self.sharded else 1.0
        self.device, self.task = engine.device, engine.task
        info = {
            **asdict(env),
            "backend": dist.get_backend(),
            "threads_per_rank": torch.get_num_threads() if engine.device.type == "cpu" else None,
            "threads_note": self.note,
            "global_batch": engine.task.batch_size,
            "rank_batch": size if self.sharded else engine.task.batch_size,
            "task_sharded": self.sharded,
            "timeout_seconds": timeout_seconds(),
        }
        if env.main:
            print(
                f"data parallel: {env.world_size} ranks ({info['backend']}, "
                f"{env.master_addr}:{env.master_port}), {self.note or 'threads as configured'}; "
                f"global batch {info['global_batch']}"
                + ("" if self.sharded else " per rank (the task does not shard)"),
                file=sys.stderr,
                flush=True,
            )
            engine.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(engine.folder / "data_parallel.json") as tmp:
                Path(tmp).write_text(json.dumps(info, indent=1))

    def wrap_model(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        # deep supervision may give an output a zero weight: its head then gets no gradient
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def loss(self, outputs: Any, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale if self.loss_scale != 1.0 else loss

    def agree(self, engine: Engine, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        device = engine.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.cpu().tolist()))

    def state_dict(self) -> dict[str, Any]:
        # every rank's random state, so that a resume continues each rank's stream
        engine_state = {"task": self.task.state_dict(), "torch_rng": torch.get_rng_state()}
        states: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(states, engine_state)
        return {"world_size": self.env.world_size, "ranks": states}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ranks = state.get("ranks") or []
        if not ranks:
            return
        mine = ranks[self.env.rank % len(ranks)]
        if self.env.rank >= len(ranks):
            print(
                f"rank {self.env.rank}: the checkpoint has {len(ranks)} rank(s); this rank "
                f"continues the random state of rank {self.env.rank % len(ranks)}",
                file=sys.stderr,
            )
        self.task.load_state_dict(mine["task"])
        torch.set_rng_state(mine["torch_rng"])


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_rank(target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    rank = os.environ.get("RANK", "?")
    try:
        target(**kwargs)
    except MedsegError as exc:
        print(f"medseg: rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        leave_process_group()


def launch(
    target: Callable[..., Any],
    kwargs: dict[str, Any],
    *,
    nproc: int,
    threads: int | None = None,
    master_port: int | None = None,
    timeout: float | None = None,
) -> None:
    """Run ``target(**kwargs)`` in ``nproc`` new processes that form one process group.

    Each process gets torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``) and
    ``OMP_NUM_THREADS`` (``threads``, default ``cores // nproc``). When one fails, the
    others get :func:`timeout_seconds` to stop on their own, then are terminated.

    Raises
    ------
    DistributedError
        Naming the first rank that failed and its exit code.
    """
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    port = master_port or free_port()
    threads = threads or max(1, usable_cores() // nproc)
    grace = timeout_seconds() if timeout is None else timeout
    ctx = multiprocessing.get_context("spawn")
    saved = dict(os.environ)
    procs = []
    try:
        for rank in range(nproc):
            # spawn copies os.environ when the child starts: torch then reads its threads
            os.environ.update(
                RANK=str(rank),
                WORLD_SIZE=str(nproc),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS=str(threads),
                MEDSEG_LAUNCHED="1",
                **{TIMEOUT_ENV: str(grace)},
            )
            p = ctx.Process(target=_run_rank, args=(target, kwargs), name=f"medseg-rank-{rank}")
            p.start()
            procs.append(p)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    failed: tuple[int, int] | None = None
    deadline = None
    try:
        while any(p.is_alive() for p in procs):
            for rank, p in enumerate(procs):
                if failed is None and p.exitcode not in (None, 0):
                    failed, deadline = (rank, p.exitcode), time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:  # a failure past the grace time, or Ctrl-C here: stop what still runs
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if failed is None:
        failed = next(((r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0), None)
    if failed is not None:
        rank, code = failed
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise DistributedError(
            f"data-parallel run: rank {rank} of {nproc} {how}; the other ranks were stopped"
        )
