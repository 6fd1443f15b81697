"""Batch inference fanned out over worker processes: on this machine or on a Ray cluster.

One case function, :func:`run_case`, reads a case, predicts it and writes its label; it
runs in every worker, whatever the engine:

- ``local``: ``workers`` processes on this machine (a spawn-started process pool);
- ``ray``: ``workers`` Ray actors, on a local Ray instance or on the cluster at
  ``address`` (medseg must be installed on its nodes and the input and output folders
  reachable from them).

Each worker loads the model once (:class:`~medseg.inference.predictor.Predictor`) and
uses ``threads`` CPU threads (default: the usable cores divided by the workers, so
workers x threads = cores). Outputs are written by the workers as cases finish (each
file written to a temporary name and renamed), so an interrupted run resumes: cases whose
output exists are skipped. A case that fails is reported with its error and the batch
goes on; the failures are written to ``failures.json`` and raised together at the end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.errors import MedsegError
from medseg.inference.batch import (
    _merge_predictions,
    _output_path,
    collect_inputs,
    group_inputs,
    label_volumes,
    read_case,
    remove_stale_temporaries,
    write_case,
)
from medseg.inference.predictor import Prediction, Predictor
from medseg.model_folder import ModelFolder
from medseg.progress import progress
from medseg.runtime import usable_cores
from medseg.serialization import write_json_atomic

ENGINES = ("local", "ray")
FAILURES_FILE = "failures.json"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to load the model once (plain values: sent to other processes)."""

    model_dir: str
    folds: tuple[int, ...] | None
    device: str
    backend: str
    precision: str
    nan_policy: str
    threads: int


@dataclass(frozen=True)
class CaseJob:
    """One case to predict: its input files and its output path."""

    case_id: str
    files: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class CaseOptions:
    """How every case is predicted (as :meth:`Predictor.infer`)."""

    mirror_axes: tuple[int, ...] = ()
    largest_component: bool = False
    fill: bool = False
    postprocess: bool = True
    uncertainty: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one case in a worker."""

    case_id: str
    prediction: Prediction | None
    error: str | None
    worker: str
    peak_rss_mb: float  # the worker process's peak resident memory so far


@dataclass
class FanoutResult:
    """A fanned-out batch: the predicted cases, the failed ones, the workers' memory."""

    predictions: list[Prediction] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    workers: dict[str, float] = field(default_factory=dict)  # worker -> peak RSS (MB)
    seconds: float = 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_worker(spec: WorkerSpec) -> Predictor:
    """The worker's predictor, loaded once, with the worker's thread limit."""
    torch.set_num_threads(spec.threads)
    return Predictor(
        spec.model_dir,
        folds=list(spec.folds) if spec.folds is not None else None,
        device=spec.device,
        backend=spec.backend,
        num_threads=spec.threads,
        precision=spec.precision,
        nan_policy=spec.nan_policy,
    )


def run_case(predictor: Predictor, job: CaseJob, options: CaseOptions) -> CaseOutcome:
    """Read, predict and write one case; an error becomes the outcome, never an exception."""
    started = time.perf_counter()
    worker = f"{os.uname().nodename}:{os.getpid()}"
    try:
        files = [Path(f) for f in job.files]
        channels = read_case(files)
        source = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        data, geometry = predictor.prepare(channels, source=source)
        label, entropy = predictor.infer(
            data,
            geometry,
            channels[0],
            mirror_axes=options.mirror_axes,
            largest_component=options.largest_component,
            fill=options.fill,
            postprocess=options.postprocess,
            uncertainty=options.uncertainty,
        )
        del data
        write_case(label, entropy, Path(job.output), overwrite=options.overwrite)
        prediction = Prediction(
            case_id=job.case_id,
            inputs=job.files,
            output=job.output,
            folds=tuple(predictor.folds),
            mirror_axes=tuple(options.mirror_axes),
            seconds=round(time.perf_counter() - started, 3),
            label_volumes_mm3=label_volumes(label, predictor.plan),
        )
        return CaseOutcome(job.case_id, prediction, None, worker, peak_rss_mb())
    except Exception as exc:  # reported per case; the batch goes on
        message = str(exc) if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {exc}"
        return CaseOutcome(job.case_id, None, message, worker, peak_rss_mb())


# ---------------------------------------------------------------- local processes

_LOCAL: dict[str, Any] = {}  # the predictor of a local worker process


def _local_init(spec: WorkerSpec) -> None:
    _LOCAL["predictor"] = load_worker(spec)


def _local_case(job: CaseJob, options: CaseOptions) -> CaseOutcome:
    return run_case(_LOCAL["predictor"], job, options)


def _run_local(
    jobs: list[CaseJob], spec: WorkerSpec, options: CaseOptions, workers: int
) -> Iterator[CaseOutcome]:
    env = os.environ.copy()
    os.environ["OMP_NUM_THREADS"] = str(spec.threads)  # the workers start with it
    try:
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_local_init,
            initargs=(spec,),
        )
    finally:
        os.environ.clear()
        os.environ.update(env)
    with pool:
        # a bounded queue: two cases per worker in flight, the rest submitted as they finish
        todo = iter(jobs)
        running = {}
        for job in todo:
            running[pool.submit(_local_case, job, options)] = job
            if len(running) >= 2 * workers:
                break
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    yield CaseOutcome(job.case_id, None, "a worker process died", "?", 0.0)
                    for other in running.values():
                        yield CaseOutcome(other.case_id, None, "a worker process died", "?", 0.0)
                    for rest in todo:
                        yield CaseOutcome(rest.case_id, None, "a worker process died", "?", 0.0)
                    return
                nxt = next(todo, None)
                if nxt is not None:
                    running[pool.submit(_local_case, nxt, options)] = nxt


# ---------------------------------------------------------------- Ray actors


class CaseWorker:
    """A Ray actor: the model loaded once, then :func:`run_case` for each case sent."""

    def __init__(self, spec: WorkerSpec) -> None:
        os.environ["OMP_NUM_THREADS"] = str(spec.threads)
        self.predictor = load_worker(spec)

    def run(self, job: CaseJob, options: CaseOptions) -> CaseOutcome:
        return run_case(self.predictor, job, options)


def _import_ray() -> Any:
    try:
        import ray  # optional: only the ray engine needs it
    except ImportError:
        raise MedsegError("--engine ray needs Ray (pip install 'medseg[scale]')") from None
    return ray


def _run_ray(
    jobs: list[CaseJob],
    spec: WorkerSpec,
    options: CaseOptions,
    workers: int,
    address: str | None,
) -> Iterator[CaseOutcome]:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            else:  # a local instance sized to the workers: no more CPUs than asked for
                ray.init(
                    num_cpus=workers * spec.threads,
                    include_dashboard=False,
                    logging_level="WARNING",
                    log_to_driver=False,
                )
        except Exception as exc:
            where = address or "a local Ray instance"
            raise MedsegError(f"could not start or reach {where}: {exc}") from None
    try:
        actor_class = ray.remote(num_cpus=spec.threads)(CaseWorker)
        actors = [actor_class.remote(spec) for _ in range(workers)]
        todo = iter(jobs)
        running: dict[Any, tuple[Any, CaseJob]] = {}

        def submit(actor: Any) -> None:
            job = next(todo, None)
            if job is not None:
                running[actor.run.remote(job, options)] = (actor, job)

        for actor in actors:  # two per actor: the next case waits while one runs
            submit(actor)
            submit(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ready[0])
            try:
                yield ray.get(ready[0])
                submit(actor)
            except ray.exceptions.RayActorError as exc:  # the worker died: others go on
                yield CaseOutcome(job.case_id, None, f"Ray worker died: {exc}", "?", 0.0)
                for ref, (a, other) in list(running.items()):
                    if a is actor:
                        del running[ref]
                        yield CaseOutcome(other.case_id, None, "Ray worker died", "?", 0.0)
                if not any(a is not actor for a, _ in running.values()):
                    for rest in todo:
                        yield CaseOutcome(rest.case_id, None, "no Ray worker left", "?", 0.0)
            except ray.exceptions.RayError as exc:
                yield CaseOutcome(job.case_id, None, f"Ray task failed: {exc}", "?", 0.0)
                submit(actor)
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------- the fan-out


def predict_fanout(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    engine: str = "local",
    workers: int = 2,
    address: str | None = None,
    threads: int | None = None,
    folds: list[int] | None = None,
    mirror_axes: tuple[int, ...] = (),
    largest_component: bool = False,
    fill: bool = False,
    overwrite: bool = False,
    output_format: str | None = None,
    device: str = "cpu",
    backend: str = "torch",
    postprocess: bool = True,
    uncertainty: bool = False,
    precision: str = "auto",
    nan_policy: str = "refuse",
    show_progress: bool = True,
    on_outcome: Callable[[CaseOutcome], None] | None = None,
) -> FanoutResult:
    """Predict every case under ``input_path`` into ``output_dir`` with ``workers`` workers.

    Parameters
    ----------
    engine
        ``"local"`` (processes on this machine) or ``"ray"`` (Ray actors).
    workers
        Worker processes (local) or actors (Ray); each loads the model once.
    address
        A Ray cluster (``ray://host:10001`` or ``host:6379``); ``None``: a local instance.
    threads
        CPU threads per worker (default: usable cores // workers, at least 1).
    on_outcome
        Called in this process for every case as it finishes.
    Other parameters
        As :func:`medseg.inference.batch.predict_to_folder`.

    Returns
    -------
    FanoutResult
        Predictions (also merged into ``predictions.json``) and failures (also in
        ``failures.json``); the caller decides whether failures are an error.
    """
    if engine not in ENGINES:
        raise MedsegError(f"unknown engine {engine!r} (use {', '.join(ENGINES)})")
    if workers < 1:
        raise MedsegError(f"--workers must be at least 1, got {workers}")
    if address and engine != "ray":
        raise MedsegError("--address needs --engine ray")
    folder = ModelFolder.open(model_dir)
    output_dir = Path(output_dir)
    groups = group_inputs(collect_inputs(input_path), folder.plan.num_channels)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    jobs = []
    for case_id, files in groups.items():
        out_path = _output_path(case_id, files, output_dir, output_format)
        if overwrite or not out_path.exists():  # resume: finished cases are skipped
            jobs.append(
                CaseJob(
                    case_id, tuple(str(Path(f).resolve()) for f in files), str(out_path.resolve())
                )
            )
    result = FanoutResult(skipped=len(groups) - len(jobs))
    if result.skipped and show_progress:
        print(
            f"{result.skipped} case(s) already predicted in {output_dir}: skipped "
            "(use --overwrite to predict them again)",
            file=sys.stderr,
        )
    if not jobs:
        return result
    workers = min(workers, len(jobs))
    spec = WorkerSpec(
        model_dir=str(Path(folder.path).resolve()),
        folds=tuple(folds) if folds is not None else None,
        device=device,
        backend=backend,
        precision=precision,
        nan_policy=nan_policy,
        threads=threads or max(1, usable_cores() // workers),
    )
    options = CaseOptions(
        mirror_axes=tuple(mirror_axes),
        largest_component=largest_component,
        fill=fill,
        postprocess=postprocess,
        uncertainty=uncertainty,
        overwrite=overwrite,
    )
    start = time.perf_counter()
    stream = (
        _run_local(jobs, spec, options, workers)
        if engine == "local"
        else _run_ray(jobs, spec, options, workers, address)
    )
    for outcome in progress(
        stream, total=len(jobs), desc=f"predict ({engine})", enabled=show_progress
    ):
        if outcome.worker != "?":
            result.workers[outcome.worker] = max(
                result.workers.get(outcome.worker, 0.0), outcome.peak_rss_mb
            )
        if outcome.prediction is not None:
            result.predictions.append(outcome.prediction)
        else:
            result.failures[outcome.case_id] = outcome.error or "failed"
            print(f"medseg: case {outcome.case_id} failed: {outcome.error}", file=sys.stderr)
        if on_outcome is not None:
            on_outcome(outcome)
    result.seconds = time.perf_counter() - start
    if result.predictions:
        _merge_predictions(output_dir / "predictions.json", result.predictions)
    failures_path = output_dir / FAILURES_FILE
    if result.failures:
        write_json_atomic(result.failures, failures_path)
    elif failures_path.exists():  # a resumed run that now succeeded
        failures_path.unlink()
    return result


def raise_failures(result: FanoutResult, output_dir: str | os.PathLike) -> None:
    """A one-line :class:`MedsegError` when cases failed (they are named in ``failures.json``)."""
    if result.failures:
        names = ", ".join(sorted(result.failures)[:5])
        more = "" if len(result.failures) <= 5 else f" and {len(result.failures) - 5} more"
        raise MedsegError(
            f"{Path(output_dir) / FAILURES_FILE}: {len(result.failures)} case(s) failed "
            f"({names}{more}); the other {len(result.predictions)} were written"
        )


def fanout_summary(result: FanoutResult) -> dict[str, Any]:
    """Plain-JSON summary of a fan-out (for logs and benchmarks)."""
    return json.loads(
        json.dumps(
            {
                "predicted": len(result.predictions),
                "failed": len(result.failures),
                "skipped": result.skipped,
                "seconds": round(result.seconds, 3),
                "worker_peak_rss_mb": {k: round(v, 1) for k, v in result.workers.items()},
            }
        )
    )
