"""Knowledge distillation (KL to the teacher decreases), fine-tuning with --init-from,
class-imbalance options, and early errors for bad configurations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.distillation import FAST
from zoo_helpers import fake_model_dir

from medseg import api
from medseg.distillation import Teacher, distillation_kl
from medseg.ensembling.members import load_fold_models
from medseg.errors import MedsegError
from medseg.model_folder import build_network
from medseg.planning.plan import read_plan
from medseg.preprocessing.preprocess import load_preprocessed, preprocessed_folder
from medseg.training import DistillConfig, train_fold


def test_distillation_moves_the_student_towards_the_teacher(setup):
    root, plan, teacher, dataset = setup
    work = root / "student"
    config = replace(FAST, deep_supervision=False)
    results = api.distill(
        dataset,
        work,
        teachers=[teacher],
        student="mobile_unet",
        temperature=2.0,
        weight=1.0,
        config=config,
        show_progress=False,
    )
    assert results[0].iterations == 18
    rows = (work / "model" / "fold_0" / "log.csv").read_text().splitlines()
    assert "train_distill_kl" in rows[0]
    report = json.loads((work / "model" / "distill_report.json").read_text())
    assert report["teacher_networks"] == 2 and report["student_val_dice"] is not None
    assert report["student_parameters"] < report["teacher_parameters"]
    assert report["speedup"] > 0
    # Direct check on held-out data: KL(teacher || student) of the trained student is lower
    # than that of the same student at initialization.
    the_plan = read_plan(work / "model")
    val = load_preprocessed(preprocessed_folder(work, the_plan), make_folds_val(work))
    x = torch.stack([torch.from_numpy(np.asarray(c.data)[:, :32, :32]) for c in val])
    _, teachers = load_fold_models(teacher)
    soft = Teacher(teachers).soft_labels(x, 2.0)
    torch.manual_seed(FAST.seed + 1000 * 0)
    initial = build_network(the_plan, name="mobile_unet", deep_supervision=False).eval()
    _, (trained,) = load_fold_models(work, folds=[0])
    with torch.no_grad():
        kl_init = distillation_kl(initial(x), soft, 2.0).item()
        kl_trained = distillation_kl(trained(x), soft, 2.0).item()
    assert kl_trained < 0.9 * kl_init


def test_train_fold_refuses_distill_without_its_hook(setup, tmp_path):
    """Training does not import distillation: a distill config needs the workflow's hook."""
    root, plan, teacher, _ = setup
    config = replace(FAST, distill=DistillConfig(teachers=(str(teacher),)))
    with pytest.raises(MedsegError, match="no distillation hook"):
        train_fold(plan, tmp_path / "pre", tmp_path / "fold_0", config, train_ids=[], val_ids=[])
    assert not (tmp_path / "fold_0").exists()


def make_folds_val(work: Path) -> list[str]:
    return json.loads((work / "model" / "splits.json").read_text())[0]["val"]


def test_teacher_with_other_labels_fails_before_training(setup, tmp_path):
    root, plan, _, dataset = setup
    other = replace(plan, labels=((0, "background"), (1, "disk"), (2, "rim")))
    bad = fake_model_dir(tmp_path / "bad_teacher", other)
    with pytest.raises(MedsegError, match="labels"):
        api.distill(dataset, tmp_path / "w", teachers=[bad], config=FAST, show_progress=False)
    assert not (tmp_path / "w" / "model").exists()  # nothing trained, nothing preprocessed


def _tiny_unet(features, norm="instance"):
    torch.manual_seed(len(features) + features[0])
    return build_model_by_name("unet", features=features, norm=norm)


def build_model_by_name(name, **options):
    from medseg.models import create_model

    return create_model(
        name, ndim=2, in_channels=1, num_classes=3, deep_supervision=False, **options
    )


def test_feature_distillation_fits_the_teacher_decoder():
    from medseg.distillation.kd import Distiller
    from medseg.training.config import DistillConfig

    teacher = Teacher([_tiny_unet((8, 16, 32)), _tiny_unet((6, 12, 24))], tap_decoders=True)
    student = _tiny_unet((4, 8, 16), norm="batch").train()
    probe = torch.zeros(1, 1, 32, 32)
    config = DistillConfig(teachers=("unused",), weight=0.0, feature_weight=1.0)
    distiller = Distiller(teacher, config, student=student, probe=probe)
    # one 1x1 adapter per (teacher network, decoder level), student -> teacher channels
    maps = distiller.adapters.maps
    assert [[m.in_channels for m in level] for level in maps] == [[8, 4], [8, 4]]
    assert [[m.out_channels for m in level] for level in maps] == [[16, 8], [12, 6]]
    params = list(student.parameters()) + list(distiller.adapters.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(60):
        optimizer.zero_grad()
        loss = distiller(torch.zeros(()), student(x), x)  # weight 0: features only
        loss.backward()
        optimizer.step()
    losses = distiller.feature_values
    assert losses[-1] < 0.7 * losses[0]


def test_feature_distillation_refuses_a_model_without_decoder():
    from medseg.distillation.kd import Distiller
    from medseg.training.config import DistillConfig

    teacher = Teacher([_tiny_unet((8, 16, 32))], tap_decoders=True)
    student = build_model_by_name("fcn", features=(4, 8, 16))
    config = DistillConfig(teachers=("unused",), feature_weight=1.0)
    with pytest.raises(MedsegError, match="U-Net-style decoder"):
        Distiller(teacher, config, student=student, probe=torch.zeros(1, 1, 32, 32))


def test_distill_with_features_logs_the_feature_loss_and_resumes(setup):
    root, _, teacher, dataset = setup
    work = root / "student_features"
    config = replace(FAST, deep_supervision=False, max_epochs=2)
    api.distill(
        dataset,
        work,
        teachers=[teacher],
        student="mobile_unet",
        feature_weight=0.5,
        config=config,
        folds=[0],
        show_progress=False,
    )
    fold = work / "model" / "fold_0"
    header, *rows = (fold / "log.csv").read_text().splitlines()
    column = header.split(",").index("train_distill_features")
    values = [float(r.split(",")[column]) for r in rows]
    assert len(values) == 2 and all(np.isfinite(values))
    state = torch.load(fold / "checkpoint_last.pt", weights_only=True)
    assert state["hooks"]["distill"]["adapters"]  # the adapters' weights travel with a resume
    more = api.distill(
        dataset,
        work,
        teachers=[teacher],
        student="mobile_unet",
        feature_weight=0.5,
        config=replace(config, max_epochs=3),
        folds=[0],
        show_progress=False,
    )
    assert more[0].epochs == 3
    with pytest.raises(MedsegError, match="feature distillation weight"):
        api.distill(dataset, work, teachers=[teacher], feature_weight=-1, config=config)


def test_bf16_teacher_soft_labels_stay_close_to_fp32():
    nets = [_tiny_unet((8, 16, 32)).eval()]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    fp32 = Teacher(nets).soft_labels(x, 2.0)
    bf16 = Teacher(nets, precision="bf16").soft_labels(x, 2.0)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.02
    assert torch.allclose(bf16.sum(1), torch.ones(2, 32, 32), atol=1e-5)
