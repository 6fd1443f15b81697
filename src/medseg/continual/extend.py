"""One extension step: a trained model folder plus a new dataset gives a new model folder.

``extend`` finds out what kind of step it is from the label maps:

- **class-incremental**: the new dataset labels classes the model does not know, with
  ids after the old ones (old classes keep their ids; where the new data do not label
  an old class it is background there). The output heads grow
  (:mod:`medseg.continual.heads`), the plan's label map gains the new classes.
- **domain-incremental**: the same label map, new data (another site or scanner).

Methods (``METHODS``), each the segmentation task on the training engine plus hooks:

==============  ==========================================================================
``naive``       fine-tuning on the new data: the baseline, always worth reporting
``lwf``         + distillation of the old network's softmax on the old classes (LwF)
``mib``         unbiased cross-entropy + unbiased distillation, MiB head initialization
``plop``        pseudo-labels of the old classes + pooled feature distillation (PLOP)
``rehearsal``   + at most K exemplar cases of the old data mixed into the training set
``ewc``         + EWC penalty, Fisher information from the exemplar cases
==============  ==========================================================================

The work folder gets an ordinary model folder (``work/model``: plan, dataset, splits,
``fold_<k>``), plus ``continual.json`` (the history of steps), ``exemplars.json`` and
``exemplars/`` (the cases kept, when K > 0 and old data were given or inherited), and
``continual/report.json`` + ``report.html`` (Dice before and after, forgetting per class).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.continual.exemplars import (
    EXEMPLARS_DIR,
    copy_into,
    read_exemplar_list,
    select_exemplars,
    store_exemplars,
)
from medseg.continual.heads import HEAD_INITS, grow_state_dict
from medseg.continual.hooks import (
    EWCHook,
    LwFHook,
    MiBHook,
    OldModel,
    PODHook,
    fisher_information,
)
from medseg.continual.report import write_step_report
from medseg.continual.task import ExtensionTask, StepLabels
from medseg.errors import MedsegError
from medseg.io.check import require_clean
from medseg.io.dataset import DatasetSpec, read_case_image
from medseg.model_folder import ModelFolder, build_network, read_weights
from medseg.planning.plan import Plan
from medseg.preprocessing import load_preprocessed, preprocess_dataset
from medseg.preprocessing.preprocess import LoadedCase
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training.config import TrainConfig
from medseg.training.engine import Engine, Hook
from medseg.training.segmentation import loop_config, validate
from medseg.training.splits import make_folds, read_splits, write_splits

METHODS = ("naive", "lwf", "mib", "plop", "rehearsal", "ewc")
NEEDS_EXEMPLARS = ("rehearsal", "ewc")
EXEMPLAR_PREFIX = "exemplar-"
CONTINUAL_JSON = "continual.json"
DEFAULT_WEIGHTS = {"lwf": 1.0, "mib": 10.0, "plop": 0.01, "ewc": 100.0}


@dataclass(frozen=True)
class ExtendResult:
    """What an extension step did: the new model folder, the step and its report."""

    model_dir: str
    method: str
    mode: str
    labels: dict[int, str]
    exemplars: list[str]
    iterations: int
    elapsed_seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    report_html: str | None = None


def _same_name(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def step_labels(
    old: dict[int, str], new: dict[int, str], *, model_dir: str | os.PathLike, dataset: str
) -> tuple[StepLabels, dict[int, str]]:
    """The relation of the old and the new label map, and the merged map.

    Raises
    ------
    MedsegError
        One line: an id that names another class than in the model (collision), a class
        the model knows under another id, or new ids that leave a gap.
    """
    for value, name in sorted(new.items()):
        if value in old and not _same_name(old[value], name):
            raise MedsegError(
                f"{dataset}: label id {value} is '{name}' but the model in {model_dir} uses "
                f"{value} for '{old[value]}'; give new classes ids from {max(old) + 1} on"
            )
        if value not in old:
            twin = [v for v, n in old.items() if _same_name(n, name)]
            if twin:
                raise MedsegError(
                    f"{dataset}: class '{name}' has id {value} but the model in {model_dir} "
                    f"knows it as {twin[0]}; old classes keep their ids"
                )
    added = sorted(v for v in new if v not in old)
    expected = list(range(max(old) + 1, max(old) + 1 + len(added)))
    if added != expected:
        raise MedsegError(
            f"{dataset}: new label ids {added} must continue the model's ids 0-{max(old)} "
            f"without a gap (use {expected})"
        )
    merged = {**old, **{v: new[v] for v in added}}
    labelled = tuple(sorted(v for v in new if v > 0))
    unlabelled = tuple(sorted(v for v in old if v > 0 and v not in new))
    mode = "class" if added else "domain"
    labels = StepLabels(
        mode=mode,
        old_classes=max(old) + 1,
        classes=max(merged) + 1,
        labelled=labelled,
        unlabelled_old=unlabelled,
    )
    return labels, merged


def check_geometry(plan: Plan, spec: DatasetSpec, *, model_dir: str | os.PathLike) -> None:
    """Refuse a dataset whose images the plan cannot take (dimensions, channels, modality).

    Reads the first case's image only.
    """
    if spec.num_channels != plan.num_channels:
        raise MedsegError(
            f"{spec.root}: {spec.num_channels} channel(s) {list(spec.channel_names)}, "
            f"but the model in {model_dir} takes {plan.num_channels} {list(plan.channel_names)}"
        )
    for i, (norm, is_ct) in enumerate(zip(plan.normalization, spec.is_ct)):
        if (norm.scheme == "ct") != is_ct:
            raise MedsegError(
                f"{spec.root}: channel {i} is {'CT' if is_ct else 'not CT'}, but the model in "
                f"{model_dir} normalizes it as {'CT' if norm.scheme == 'ct' else 'non-CT'}"
            )
    cases = [c for c in spec.cases if c.label]
    if not cases:
        raise MedsegError(f"{spec.root}: no labelled cases to extend the model with")
    image = read_case_image(spec, cases[0])[0]
    if image.ndim != plan.ndim:
        raise MedsegError(
            f"{cases[0].images[0]}: a {image.ndim}D image, but the model in {model_dir} "
            f"is {plan.ndim}D ({plan.configuration})"
        )


def dice_on_cases(
    network: torch.nn.Module, cases: list[LoadedCase], plan: Plan, *, device: str = "cpu"
) -> np.ndarray:
    """Mean Dice per foreground class of ``network`` on preprocessed ``cases`` (NaN: a
    class absent from every case)."""
    if not cases:
        return np.full(plan.num_classes - 1, np.nan)
    network.eval()
    with warnings.catch_warnings():  # NaN for a class absent from every case is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        return validate(network, cases, plan, torch.device(device), mirror=False)


def _choose_fold(folder: ModelFolder, fold: int | None) -> int:
    if fold is not None:
        return folder.select_folds([fold], "best")[0]
    found = folder.folds("best") or folder.folds("last")
    return found[0]


def _kind(folder: ModelFolder, fold: int) -> str:
    return "best" if fold in folder.folds("best") else "last"


def _folds_for(
    spec: DatasetSpec, *, split_file: str | os.PathLike | None, seed: int, num_folds: int
) -> list[dict[str, list[str]]]:
    if split_file is not None:
        folds = read_splits(split_file)
    else:
        folds = make_folds(
            [c.case_id for c in spec.cases if c.label], num_folds=num_folds, seed=seed
        )
    known = {c.case_id for c in spec.cases}
    unknown = sorted({i for f in folds for i in f["train"] + f["val"]} - known)
    if unknown:
        raise MedsegError(
            f"{split_file}: names case(s) not in {spec.root}: {', '.join(unknown[:5])}"
        )
    return folds


def _old_data(
    old: ModelFolder,
    old_spec: DatasetSpec,
    work: Path,
    *,
    fold: int,
    num_workers: int,
    show_progress: bool,
) -> tuple[Path, list[str], list[str]]:
    """Preprocess the old dataset with the old plan: its folder, train and val ids (the
    old model's split of ``fold`` where it has one, else every case is a training case)."""
    splits = old.path / "splits.json"
    known = {c.case_id for c in old_spec.cases if c.label}
    if splits.is_file():
        folds = read_splits(splits)
        train = [i for i in folds[min(fold, len(folds) - 1)]["train"] if i in known]
        val = [i for i in folds[min(fold, len(folds) - 1)]["val"] if i in known]
    else:
        train, val = sorted(known), []
    pre = preprocess_dataset(
        old_spec,
        old.plan,
        work / "old_data",
        case_ids=train + val,
        num_workers=num_workers,
        show_progress=show_progress,
    )
    return pre, train, val


def make_hooks(
    method: str,
    *,
    labels: StepLabels,
    old: OldModel | None,
    weight: float | None,
    anchor: dict[str, torch.Tensor] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
) -> list[Hook]:
    """The engine hooks of ``method`` (see the module's table)."""
    w = DEFAULT_WEIGHTS.get(method, 0.0) if weight is None else weight
    if method == "lwf" and old is not None:
        return [LwFHook(old, weight=w)]
    if method == "mib" and old is not None:
        return [MiBHook(old, new_classes=labels.new, weight=w)]
    if method == "plop" and old is not None:
        return [PODHook(old, weight=w, classes=labels.classes, new_classes=max(len(labels.new), 1))]
    if method == "ewc" and anchor is not None and fisher is not None:
        return [EWCHook(anchor, fisher, weight=w)]
    return []


def extend(
    model_dir: str | os.PathLike,
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    method: str = "naive",
    exemplars: int = 5,
    old_dataset: str | os.PathLike | None = None,
    fold: int | None = None,
    config: TrainConfig | None = None,
    split_file: str | os.PathLike | None = None,
    weight: float | None = None,
    replay_share: float = 0.25,
    head_init: str = "copy",
    num_workers: int = 2,
    show_progress: bool = True,
) -> ExtendResult:
    """Extend a trained model with new classes or a new site (see the module).

    Parameters
    ----------
    model_dir
        The trained model folder (or a work folder holding ``model/``).
    dataset
        The new dataset (checked first).
    work_dir
        The new work folder: ``work_dir/model`` is the extended model folder.
    method
        One of :data:`METHODS`.
    exemplars
        K: at most this many old cases are kept (chosen from ``old_dataset``, else taken
        from the exemplars ``model_dir`` keeps). 0 keeps none.
    old_dataset
        The old data, if still available: exemplars are chosen from its training cases
        and the old task is evaluated on its validation cases.
    fold
        The old model's fold to extend (default: its first trained fold).
    config
        Training settings (iterations, optimizer, ...); its ``fold`` selects the new
        dataset's fold.
    split_file
        The new dataset's folds (default: k-fold of its labelled cases).
    weight
        Weight of the method's extra term (default :data:`DEFAULT_WEIGHTS`).
    replay_share
        ``rehearsal``: the share of training patches drawn from the exemplars.
    head_init
        How the new classes' head rows start: ``"copy"`` (fresh initialization; the
        default) or ``"mib"`` (MiB's copy of the background; see
        :mod:`medseg.continual.heads`). With MiB's start the new rows equal the
        background's and only drift apart at the head's learning speed, which short CPU
        budgets do not give (see docs/continual.md).

    Raises
    ------
    MedsegError
        Colliding label ids, images the plan cannot take, a method that needs exemplars
        when none are kept.
    """
    spec = require_clean(dataset)
    old_spec = require_clean(old_dataset) if old_dataset is not None else None
    return extend_spec(
        model_dir,
        spec,
        work_dir,
        method=method,
        exemplars=exemplars,
        old_spec=old_spec,
        fold=fold,
        config=config,
        split_file=split_file,
        weight=weight,
        replay_share=replay_share,
        head_init=head_init,
        num_workers=num_workers,
        show_progress=show_progress,
    )


def extend_spec(
    model_dir: str | os.PathLike,
    spec: DatasetSpec,
    work_dir: str | os.PathLike,
    *,
    method: str = "naive",
    exemplars: int = 5,
    old_spec: DatasetSpec | None = None,
    fold: int | None = None,
    config: TrainConfig | None = None,
    split_file: str | os.PathLike | None = None,
    weight: float | None = None,
    replay_share: float = 0.25,
    head_init: str = "copy",
    num_workers: int = 2,
    show_progress: bool = True,
) -> ExtendResult:
    """:func:`extend` on datasets already read (and checked) into :class:`DatasetSpec`."""
    started = time.perf_counter()
    if method not in METHODS:
        raise MedsegError(f"unknown continual method {method!r} (use {', '.join(METHODS)})")
    if exemplars < 0:
        raise MedsegError(f"--exemplars must be >= 0 (got {exemplars})")
    if head_init not in HEAD_INITS:
        raise MedsegError(
            f"unknown head initialization {head_init!r} (use {', '.join(HEAD_INITS)})"
        )
    if not 0 < replay_share < 1:
        raise MedsegError(f"replay share must be between 0 and 1 (got {replay_share})")
    config = config or TrainConfig()
    old = ModelFolder.open(model_dir)
    old_fold = _choose_fold(old, fold)
    labels, merged = step_labels(
        old.labels, dict(spec.labels), model_dir=old.path, dataset=spec.root
    )
    check_geometry(old.plan, spec, model_dir=old.path)
    inherited = read_exemplar_list(old.path)
    if method in NEEDS_EXEMPLARS and (
        exemplars == 0 or (old_spec is None and not (inherited and inherited["cases"]))
    ):
        raise MedsegError(
            f"method '{method}' needs exemplars of the old data, but none are kept "
            f"({'--exemplars is 0' if exemplars == 0 else f'{old.path} stores none'}; "
            "give --old-dataset OLD and --exemplars K > 0)"
        )

    work = Path(work_dir)
    model_out = work / "model"
    model_out.mkdir(parents=True, exist_ok=True)
    network_name = old.network_name(old_fold, _kind(old, old_fold))
    plan = replace(
        old.plan,
        labels=tuple(sorted(merged.items())),
        network=replace(old.plan.network, name=network_name),
        notes=(*old.plan.notes, f"extended ({labels.mode}-incremental, {method}) from {old.path}"),
    )
    config = replace(config, model=network_name)

    # Old data: exemplars (chosen now, or inherited) and the old task's validation cases.
    old_val: list[LoadedCase] = []
    exemplar_ids: list[str] = []
    exemplar_source: Path | None = None
    origin: dict[str, Any] = {}
    if old_spec is not None:
        pre_old, old_train, old_val_ids = _old_data(
            old, old_spec, work, fold=old_fold, num_workers=num_workers, show_progress=show_progress
        )
        old_val = load_preprocessed(pre_old, old_val_ids)
        if exemplars > 0:
            candidates = load_preprocessed(pre_old, old_train)
            exemplar_ids = select_exemplars(candidates, exemplars, num_classes=labels.old_classes)
            exemplar_source = pre_old
            origin = {"dataset": str(old_spec.root), "model": str(old.path)}
    elif inherited and inherited["cases"] and exemplars > 0:
        exemplar_ids = [str(c) for c in inherited["cases"]][:exemplars]
        exemplar_source = old.path / EXEMPLARS_DIR
        origin = {"dataset": inherited.get("dataset"), "model": str(old.path), "inherited": True}
    if exemplar_source is not None and exemplar_ids:
        store_exemplars(model_out, exemplar_source, exemplar_ids, k=exemplars, origin=origin)
    if method in NEEDS_EXEMPLARS and not exemplar_ids:
        raise MedsegError(
            f"method '{method}' needs exemplars of the old data, but none of the old model's "
            f"training cases are in {old_spec.root if old_spec else old.path}"
        )

    # New data: preprocessed with the grown plan; exemplars join when rehearsing.
    pre = preprocess_dataset(spec, plan, work, num_workers=num_workers, show_progress=show_progress)
    folds = _folds_for(spec, split_file=split_file, seed=config.seed, num_folds=config.num_folds)
    write_splits(folds, model_out / "splits.json")
    if not 0 <= config.fold < len(folds):
        raise MedsegError(f"fold {config.fold} does not exist (the splits have {len(folds)})")
    train_ids = list(folds[config.fold]["train"])
    val_ids = list(folds[config.fold]["val"])
    if method == "rehearsal":
        joined = copy_into(model_out / EXEMPLARS_DIR, exemplar_ids, pre, EXEMPLAR_PREFIX)
        # Repeat the exemplars so that they make up about replay_share of the draws.
        repeat = max(
            1, math.ceil(replay_share * len(train_ids) / ((1 - replay_share) * len(joined)))
        )
        train_ids = train_ids + joined * repeat

    write_json_atomic(plan, model_out / "plan.json")
    write_json_atomic(
        {**spec.to_json(), "labels": [list(p) for p in plan.labels]}, model_out / "dataset.json"
    )

    # The old network, the grown starting point, and the method's hooks.
    torch.manual_seed(config.seed)
    old_state, _ = read_weights(old.fold_dir(old_fold), _kind(old, old_fold))
    fresh = build_network(plan, name=network_name).state_dict()
    start = grow_state_dict(
        old_state,
        fresh,
        old_classes=labels.old_classes,
        new_classes=labels.classes,
        init=head_init,
    )
    old_network = old.load_networks([old_fold], kind=_kind(old, old_fold), fuse_batchnorm=False)[0]
    needs_old = method in ("lwf", "mib", "plop")
    old_model = OldModel(old_network, tap_features=method == "plop") if needs_old else None
    anchor = fisher = None
    if method == "ewc":
        grown = build_network(plan, name=network_name)
        grown.load_state_dict(start)
        exemplar_cases = load_preprocessed(model_out / EXEMPLARS_DIR, exemplar_ids)
        fisher = fisher_information(
            grown, exemplar_cases, patch_size=plan.patch_size, seed=config.seed
        )
        anchor = {k: v for k, v in start.items() if k in fisher}
    hooks = make_hooks(
        method, labels=labels, old=old_model, weight=weight, anchor=anchor, fisher=fisher
    )

    fold_dir = model_out / f"fold_{config.fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    # A work folder resumes its own step only: never another method's or model's checkpoint.
    step_file = fold_dir / "extend_step.json"
    this_step = {"from": str(old.path), "fold": old_fold, "method": method, "head_init": head_init}
    if step_file.is_file() and json.loads(step_file.read_text()) != this_step:
        raise MedsegError(
            f"{fold_dir}: holds another extension step ({step_file.name}); use another --work-dir"
        )
    write_json_atomic(this_step, step_file)
    write_json_atomic(
        replace(
            config,
            optimizer=config.resolved_optimizer(),
            learning_rate=config.resolved_learning_rate(),
        ),
        fold_dir / "train_config.json",
    )
    task = ExtensionTask(
        plan,
        pre,
        fold_dir,
        config,
        train_ids=train_ids,
        val_ids=val_ids,
        labels=labels,
        method=method,
        old_plan=old.plan,
        old=old_model,
    )
    loop = Engine(
        task, fold_dir, loop_config(config), hooks=hooks, show_progress=show_progress
    ).fit(initial_weights=start)
    write_json_atomic(
        {
            "fold_dir": str(fold_dir),
            "epochs": loop.epochs,
            "iterations": loop.iterations,
            "elapsed_seconds": round(loop.elapsed_seconds, 2),
            "stopped_because": loop.stopped_because,
            "best_val_dice": loop.best_score if loop.best_score is not None else -1.0,
            "best_val_dice_per_class": loop.best_details,
        },
        fold_dir / "train_result.json",
    )

    # Before and after, on the old task and the new one.
    new_val = load_preprocessed(pre, val_ids)
    new_network = ModelFolder.open(model_out).load_networks([config.fold], fuse_batchnorm=False)[0]
    report = step_report(
        old_network,
        new_network,
        old_plan=old.plan,
        plan=plan,
        labels=labels,
        old_val=old_val,
        new_val=new_val,
    )
    history = _history(old.path)
    history.append(
        {
            "from": str(old.path),
            "fold": old_fold,
            "dataset": str(spec.root),
            "mode": labels.mode,
            "method": method,
            "weight": DEFAULT_WEIGHTS.get(method) if weight is None else weight,
            "head_init": head_init,
            "labels_before": {str(k): v for k, v in sorted(old.labels.items())},
            "labels_after": {str(k): v for k, v in sorted(merged.items())},
            "exemplars": exemplar_ids,
            "iterations": loop.iterations,
        }
    )
    write_json_atomic({"steps": history}, model_out / CONTINUAL_JSON)
    html = write_step_report(
        report,
        work / "continual",
        title=f"medseg extend: {labels.mode}-incremental step with {method}",
    )
    return ExtendResult(
        model_dir=str(model_out),
        method=method,
        mode=labels.mode,
        labels=merged,
        exemplars=exemplar_ids,
        iterations=loop.iterations,
        elapsed_seconds=round(time.perf_counter() - started, 2),
        report=report,
        report_html=str(html),
    )


def _history(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / CONTINUAL_JSON
    if not path.is_file():
        return []
    try:
        steps = json.loads(path.read_text()).get("steps", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        raise MedsegError(f"{path}: unreadable continual-learning history") from None
    return list(steps) if isinstance(steps, list) else []


def step_report(
    old_network: torch.nn.Module,
    new_network: torch.nn.Module,
    *,
    old_plan: Plan,
    plan: Plan,
    labels: StepLabels,
    old_val: list[LoadedCase],
    new_val: list[LoadedCase],
) -> dict[str, Any]:
    """Dice per class before and after the step, on the old task and on the new one.

    Old task: the old dataset's validation cases (when given), its foreground classes.
    New task: the new dataset's validation cases, the classes they label; before the
    step the old network scores 0 on a class it cannot predict. Forgetting of a class is
    its old-task Dice before minus after.
    """
    names = dict(plan.labels)

    def scores(network: torch.nn.Module, cases: list[LoadedCase], p: Plan) -> dict[int, float]:
        values = dice_on_cases(network, cases, p)
        return {c: float(v) for c, v in enumerate(values, 1)}

    rows = []
    old_before = scores(old_network, old_val, old_plan) if old_val else {}
    old_after = scores(new_network, old_val, plan) if old_val else {}
    new_before = scores(old_network, new_val, old_plan)
    new_after = scores(new_network, new_val, plan)
    for c in range(1, plan.num_classes):
        row: dict[str, Any] = {"class": c, "name": names.get(c, str(c))}
        if c < labels.old_classes and old_val:
            row["old_task_before"] = old_before.get(c)
            row["old_task_after"] = old_after.get(c)
            if row["old_task_before"] is not None and row["old_task_after"] is not None:
                row["forgetting"] = row["old_task_before"] - row["old_task_after"]
        if c in labels.labelled:
            row["new_task_before"] = new_before.get(c, 0.0) if c < labels.old_classes else 0.0
            row["new_task_after"] = new_after.get(c)
        rows.append(row)
    summary = {
        "mode": labels.mode,
        "old_classes": labels.old_classes,
        "classes": labels.classes,
        "old_task_cases": len(old_val),
        "new_task_cases": len(new_val),
        "rows": rows,
    }
    for key in (
        "old_task_before",
        "old_task_after",
        "new_task_before",
        "new_task_after",
        "forgetting",
    ):
        values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        summary[f"mean_{key}"] = float(np.mean(values)) if values else None
    return to_jsonable(summary)
