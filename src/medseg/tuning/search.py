"""Hyper-parameter search with Optuna over plan and training options.

A search space is a YAML (or JSON) mapping from an option to its range::

    learning_rate: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
    optimizer: {type: categorical, choices: [sgd, adamw]}
    loss: {type: categorical, choices: [dice_ce, dice_focal, tversky_ce]}
    plan.batch_size: {type: int, low: 2, high: 8}
    plan.foreground_oversampling: {type: float, low: 0.2, high: 0.6}
    plan.network.width: {type: categorical, choices: [0.5, 1.0]}  # scales the widths

Keys are :class:`~medseg.training.TrainConfig` fields, ``plan.<field>`` for plan fields
that do not change preprocessing (``batch_size``, ``foreground_oversampling``),
``plan.network.<field>`` for :class:`~medseg.planning.plan.NetworkPlan` fields, and
``plan.network.width`` (a multiplier of the feature widths). With the grid sampler every
option must list its values (``choices``).

Every trial trains one fold in ``work_dir/tuning/trial_<n>/`` and reports its validation
Dice after each epoch, so the median or Hyperband pruner stops poor trials early. The
study lives in ``work_dir/tuning/study.db`` (SQLite): run the same command again and a
killed search resumes, re-running the trials that were cut off.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

from medseg.errors import MedsegError
from medseg.imaging.atomic import write_text_atomic
from medseg.io.check import require_clean
from medseg.planning.plan import NetworkPlan, Plan
from medseg.planning.work_dir import plan_for
from medseg.preprocessing import preprocess_dataset
from medseg.runtime import usable_cores
from medseg.serialization import write_json_atomic
from medseg.training import TrainConfig, make_folds, read_splits, train_fold, write_splits
from medseg.training.finetune import check_train_config

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "hyperband", "none")
PLAN_KEYS = ("batch_size", "foreground_oversampling")
STUDY_NAME = "medseg"


def load_space(space: str | os.PathLike | dict) -> dict[str, dict]:
    """Read and check a search space; raises :class:`MedsegError` naming the bad entry."""
    source = "search space"
    if not isinstance(space, dict):
        import yaml

        path = Path(space)
        source = str(path)
        try:
            space = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise MedsegError(f"{path}: search space file not found") from None
        except yaml.YAMLError as exc:
            raise MedsegError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(space, dict) or not space:
        raise MedsegError(f"{source}: empty search space (expected option: {{type: ...}} entries)")
    config_keys = {f.name for f in fields(TrainConfig)}
    network_keys = {f.name for f in fields(NetworkPlan)} | {"width"}
    out = {}
    for key, spec in space.items():
        where = f"{source}: {key}"
        if key.startswith("plan.network."):
            if key[len("plan.network.") :] not in network_keys:
                raise MedsegError(f"{where}: unknown network option")
        elif key.startswith("plan."):
            if key[len("plan.") :] not in PLAN_KEYS:
                raise MedsegError(
                    f"{where}: only plan.{', plan.'.join(PLAN_KEYS)} and plan.network.* can be tuned"
                )
        elif key not in config_keys or key in ("fold", "num_folds", "distill", "augmentation"):
            raise MedsegError(f"{where}: not a tunable training option")
        if not isinstance(spec, dict):
            spec = {"type": "categorical", "choices": spec if isinstance(spec, list) else [spec]}
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise MedsegError(f"{where}: no valid values (empty choices)")
            out[key] = {"type": kind, "choices": choices}
        elif kind in ("float", "int"):
            try:
                low, high = float(spec["low"]), float(spec["high"])
            except (KeyError, TypeError, ValueError):
                raise MedsegError(f"{where}: {kind} needs numeric low and high") from None
            log = bool(spec.get("log", False))
            if not low <= high or (log and low <= 0) or math.isnan(low + high):
                raise MedsegError(f"{where}: no valid values (low={low}, high={high}, log={log})")
            if kind == "int" and math.floor(high) < math.ceil(low):
                raise MedsegError(f"{where}: no integer between {low} and {high}")
            out[key] = {"type": kind, "low": low, "high": high, "log": log}
        else:
            raise MedsegError(f"{where}: type must be float, int or categorical (got {kind!r})")
    return out


def grid_values(space: dict[str, dict]) -> dict[str, list]:
    grid = {}
    for key, spec in space.items():
        if spec["type"] != "categorical":
            raise MedsegError(f"{key}: the grid sampler needs a list of values (choices)")
        grid[key] = spec["choices"]
    return grid


def suggest(trial, space: dict[str, dict]) -> dict:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(
                key, math.ceil(spec["low"]), math.floor(spec["high"]), log=spec["log"]
            )
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
    return params


def apply_params(plan: Plan, config: TrainConfig, params: dict) -> tuple[Plan, TrainConfig]:
    """The plan and training configuration of one trial."""
    network_changes, plan_changes, config_changes = {}, {}, {}
    for key, value in params.items():
        if key.startswith("plan.network."):
            network_changes[key[len("plan.network.") :]] = value
        elif key.startswith("plan."):
            plan_changes[key[len("plan.") :]] = value
        else:
            config_changes[key] = value
    width = network_changes.pop("width", None)
    network = replace(plan.network, **network_changes)
    if width is not None:
        network = replace(
            network, features=tuple(max(4, int(round(f * float(width)))) for f in network.features)
        )
    return replace(plan, network=network, **plan_changes), replace(config, **config_changes)


def _sampler(name: str, space: dict[str, dict], seed: int):
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler(grid_values(space), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    raise MedsegError(f"unknown sampler {name!r} (use {', '.join(SAMPLERS)})")


def _pruner(name: str, max_epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 3))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise MedsegError(f"unknown pruner {name!r} (use {', '.join(PRUNERS)})")


def open_study(tuning_dir: Path, *, sampler, pruner):
    """Create or reopen the SQLite study; trials cut off by a kill are failed and re-queued."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuning_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(tuning_dir / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
    return study


def run_study(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    space: str | os.PathLike | dict,
    trials: int = 20,
    time_budget_minutes: float | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    config: TrainConfig | None = None,
    fold: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    parallel: int = 1,
    show_progress: bool = True,
) -> dict:
    """Run (or resume) a search until ``trials`` trials are finished or the time budget ends.

    Returns a summary (best value, parameters, trial counts, paths) that is also written
    to ``work_dir/tuning/summary.json``; ``best_plan.json`` and ``best_train_config.json``
    hold the winner (use the plan as a work folder's ``plan.json``).
    """
    import optuna

    if trials < 1:
        raise MedsegError(f"--trials must be at least 1 (got {trials})")
    if sampler not in SAMPLERS:
        raise MedsegError(f"unknown sampler {sampler!r} (use {', '.join(SAMPLERS)})")
    if pruner not in PRUNERS:
        raise MedsegError(f"unknown pruner {pruner!r} (use {', '.join(PRUNERS)})")
    the_space = load_space(space)
    if sampler == "grid":
        grid_values(the_space)
    config = config or TrainConfig()
    work = Path(work_dir)
    spec = require_clean(dataset)
    base_plan = plan_for(spec, work, num_workers=num_workers, show_progress=show_progress)
    # Every choice must make a valid configuration: check the extremes before any training.
    for key, s in the_space.items():
        values = s["choices"] if s["type"] == "categorical" else [s["low"], s["high"]]
        for v in values:
            if s["type"] == "int":
                v = int(v)
            try:
                p, c = apply_params(base_plan, config, {key: v})
            except (TypeError, ValueError) as exc:
                raise MedsegError(f"search space: {key}={v!r} is not valid ({exc})") from None
            check_train_config(c, p)
    pre = preprocess_dataset(
        spec, base_plan, work, num_workers=num_workers, show_progress=show_progress
    )
    tuning = work / "tuning"
    tuning.mkdir(parents=True, exist_ok=True)
    split_path = tuning / "splits.json"
    if split_path.exists():
        folds = read_splits(split_path)
    else:
        folds = make_folds(
            [c.case_id for c in spec.cases if c.label], num_folds=config.num_folds, seed=seed
        )
        write_splits(folds, split_path)
    if not 0 <= fold < len(folds):
        raise MedsegError(f"fold {fold} does not exist (the splits have {len(folds)})")
    write_json_atomic(
        {"space": the_space, "sampler": sampler, "pruner": pruner}, tuning / "space.json"
    )
    study = open_study(
        tuning,
        sampler=_sampler(sampler, the_space, seed),
        pruner=_pruner(pruner, config.max_epochs),
    )
    threads = max(1, (config.num_threads or usable_cores()) // max(parallel, 1))

    def objective(trial) -> float:
        params = suggest(trial, the_space)
        plan, trial_config = apply_params(base_plan, config, params)
        trial_config = replace(trial_config, fold=fold, num_threads=threads)
        trial_dir = tuning / f"trial_{trial.number}"
        if trial_dir.exists():  # a re-run of a trial that was cut off starts clean
            shutil.rmtree(trial_dir)
        write_json_atomic(plan, trial_dir / "plan.json")

        def report(row: dict) -> bool:
            value = row.get("val_dice_mean")
            if value is None or math.isnan(value):
                return False
            trial.report(float(value), int(row["epoch"]))
            return trial.should_prune()

        result = train_fold(
            plan,
            pre,
            trial_dir / f"fold_{fold}",
            trial_config,
            train_ids=folds[fold]["train"],
            val_ids=folds[fold]["val"],
            resume=False,
            show_progress=show_progress,
            on_epoch=report,
        )
        if result.stopped_because == "pruned":
            raise optuna.TrialPruned()
        return float(result.best_val_dice)

    states = optuna.trial.TrialState
    done = [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
    remaining = trials - len(done)
    started = time.perf_counter()
    if remaining > 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=time_budget_minutes * 60 if time_budget_minutes else None,
            n_jobs=max(parallel, 1),
            catch=(),
        )
    completed = [t for t in study.trials if t.state == states.COMPLETE]
    if not completed:
        raise MedsegError(f"{tuning}: no trial completed (all pruned or failed)")
    best = study.best_trial
    best_plan, best_config = apply_params(base_plan, config, best.params)
    write_json_atomic(best_plan, tuning / "best_plan.json")
    write_json_atomic(replace(best_config, fold=0), tuning / "best_train_config.json")
    summary = {
        "best_value": best.value,
        "best_params": best.params,
        "best_trial": best.number,
        "trials": {
            s.name.lower(): sum(t.state == s for t in study.trials)
            for s in (states.COMPLETE, states.PRUNED, states.FAIL, states.RUNNING)
        },
        "sampler": sampler,
        "pruner": pruner,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "best_plan": str(tuning / "best_plan.json"),
        "best_train_config": str(tuning / "best_train_config.json"),
        "study": str(tuning / "study.db"),
    }
    summary["report"] = str(write_report(study, tuning, summary))
    write_json_atomic(summary, tuning / "summary.json")
    return summary


def write_report(study, tuning: Path, summary: dict) -> Path:
    """report.html with the trial table, a parallel-coordinate plot and parameter importances."""
    import base64
    import html
    import io

    images = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        for title, plot in (
            ("Parallel coordinates", ovm.plot_parallel_coordinate),
            ("Parameter importances", ovm.plot_param_importances),
            ("Optimization history", ovm.plot_optimization_history),
        ):
            try:
                with warnings.catch_warnings():  # "experimental" and degenerate-axis notices
                    warnings.simplefilter("ignore")
                    ax = plot(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
                plt.close(fig)
                (tuning / f"{title.lower().replace(' ', '_')}.png").write_bytes(buf.getvalue())
                images.append((title, base64.b64encode(buf.getvalue()).decode()))
            except Exception as exc:  # too few trials for a plot: say so instead
                images.append((title, f"not available ({html.escape(str(exc)[:120])})"))
    except ImportError:
        pass
    rows = "".join(
        f"<tr><td>{t.number}</td><td>{t.state.name}</td><td>{'' if t.value is None else f'{t.value:.4f}'}</td>"
        f"<td>{html.escape(json.dumps(t.params))}</td></tr>"
        for t in study.trials
    )
    figures = "".join(
        f"<h2>{t}</h2>"
        + (f'<img src="data:image/png;base64,{d}">' if not d.startswith("not ") else f"<p>{d}</p>")
        for t, d in images
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>medseg tuning</title>"
        f"<h1>medseg tuning</h1><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre>"
        f"{figures}<h2>Trials</h2><table border=1><tr><th>#</th><th>state</th><th>Dice</th>"
        f"<th>params</th></tr>{rows}</table>"
    )
    return write_text_atomic(page, tuning / "report.html")
