"""``extend``: label checks, exemplar storage, and an extended folder that predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.continual import write_blob_dataset
from zoo_helpers import fake_model_dir, tiny_plan

from medseg import api
from medseg.continual import step_labels
from medseg.continual.exemplars import EXEMPLARS_DIR, read_exemplar_list
from medseg.errors import MedsegError
from medseg.io import Image, read_image, write_image
from medseg.io.dataset import load_dataset
from medseg.model_folder import ModelFolder
from medseg.training import TrainConfig, make_folds
from medseg.transforms import AugmentConfig

FAST = TrainConfig(
    max_epochs=1,
    iterations_per_epoch=4,
    batch_size=2,
    optimizer="adamw",
    learning_rate=3e-3,
    augmentation=AugmentConfig(enabled=False),
    device="cpu",
    num_threads=1,
    num_folds=2,
    seed=1,
)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """An old dataset (ball), a new one (box only: the ball is background there), and a
    model folder of the old dataset's plan with random weights."""
    root = tmp_path_factory.mktemp("continual")
    old = write_blob_dataset(root / "old", labels={1: "ball"}, num_cases=6, seed=0)
    new = write_blob_dataset(root / "new", labels={2: "box"}, num_cases=6, seed=1)
    plan = tiny_plan(api.plan(old, root / "plan", show_progress=False))
    ids = [c.case_id for c in load_dataset(old).cases]
    model = fake_model_dir(root / "old_model", plan, splits=make_folds(ids, num_folds=2, seed=0))
    return root, old, new, model


def test_step_labels_class_and_domain():
    old = {0: "background", 1: "ball"}
    labels, merged = step_labels(old, {0: "background", 2: "box"}, model_dir="m", dataset="d")
    assert (labels.mode, labels.new, labels.unlabelled_old) == ("class", (2,), (1,))
    assert merged == {0: "background", 1: "ball", 2: "box"}
    labels, merged = step_labels(old, {0: "background", 1: "Ball"}, model_dir="m", dataset="d")
    assert (labels.mode, labels.new, merged) == ("domain", (), old)


@pytest.mark.parametrize(
    "new, words",
    [
        ({0: "background", 1: "box"}, "label id 1 is 'box'"),  # collision
        ({0: "background", 3: "box"}, "without a gap"),
        ({0: "background", 2: "ball"}, "old classes keep their ids"),
    ],
)
def test_step_labels_refuses_with_one_line(new, words):
    with pytest.raises(MedsegError) as err:
        step_labels({0: "background", 1: "ball"}, new, model_dir="m", dataset="d")
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_colliding_label_id_is_refused_with_one_line(blobs, tmp_path):
    root, _, _, model = blobs
    clash = write_blob_dataset(tmp_path / "clash", labels={1: "box"}, num_cases=2, seed=3)
    with pytest.raises(MedsegError) as err:
        api.extend(model, clash, tmp_path / "w", method="naive", config=FAST, show_progress=False)
    message = str(err.value)
    assert "\n" not in message and "label id 1 is 'box'" in message and str(clash) in message


def test_method_needing_exemplars_is_refused_when_none_are_kept(blobs, tmp_path):
    _, old, new, model = blobs
    for kwargs in ({}, {"old_dataset": old, "exemplars": 0}):
        with pytest.raises(MedsegError) as err:
            api.extend(model, new, tmp_path / "w", method="ewc", config=FAST, **kwargs)
        assert "needs exemplars" in str(err.value) and "\n" not in str(err.value)


def test_geometry_the_plan_cannot_take_is_refused(blobs, tmp_path):
    _, _, _, model = blobs
    flat = tmp_path / "flat"
    for sub in ("imagesTr", "labelsTr"):
        (flat / sub).mkdir(parents=True)
    image = np.zeros((16, 16), np.float32)
    write_image(Image(image, (1.0, 1.0)), flat / "imagesTr" / "c_0000.nii.gz")
    write_image(Image(image.astype(np.uint8), (1.0, 1.0)), flat / "labelsTr" / "c.nii.gz")
    meta = {"name": "flat", "modality": {"0": "MR"}, "labels": {"0": "background", "2": "box"}}
    (flat / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegError) as err:
        api.extend(model, flat, tmp_path / "w", config=FAST, show_progress=False)
    assert "2D image" in str(err.value) and "3D" in str(err.value)
    assert "\n" not in str(err.value)


def test_rehearsal_stores_at_most_k_exemplars_and_the_folder_predicts(blobs, tmp_path):
    root, old, new, model = blobs
    result = api.extend(
        model,
        new,
        tmp_path / "w",
        method="rehearsal",
        exemplars=2,
        old_dataset=old,
        config=FAST,
        num_workers=1,
        show_progress=False,
    )
    out = ModelFolder.open(result.model_dir)
    assert out.labels == {0: "background", 1: "ball", 2: "box"}
    assert out.plan.num_classes == 3 and result.mode == "class"
    # exemplar storage respects K and says which cases it keeps
    listing = read_exemplar_list(out.path)
    assert len(listing["cases"]) == 2 == len(result.exemplars) and listing["k"] == 2
    old_ids = {c.case_id for c in load_dataset(old).cases}
    assert set(listing["cases"]) <= old_ids
    stored = sorted(p.name for p in (out.path / EXEMPLARS_DIR).iterdir())
    assert stored == sorted(
        f"{c}{s}" for c in listing["cases"] for s in ("_data.npy", "_seg.npy", ".json")
    )
    history = json.loads((out.path / "continual.json").read_text())["steps"]
    assert history[-1]["method"] == "rehearsal" and history[-1]["exemplars"] == listing["cases"]
    report = (tmp_path / "w" / "continual" / "report.html").read_text()
    assert "forgetting" in report and "data:image/png;base64," in report
    # the extended folder is an ordinary model folder: it predicts all three classes' ids
    case = load_dataset(new).cases[0]
    preds = api.predict(
        out.path, case.images[0], tmp_path / "pred", device="cpu", show_progress=False
    )
    mask = read_image(preds[0].output).array
    assert mask.shape == read_image(case.images[0]).array.shape
    assert set(np.unique(mask)) <= {0, 1, 2}

    # a second step inherits the exemplars without the old data, and keeps at most K
    third = write_blob_dataset(
        tmp_path / "third", labels={1: "ball", 2: "box"}, num_cases=4, seed=5
    )
    second = api.extend(
        out.path,
        third,
        tmp_path / "w2",
        method="ewc",
        exemplars=1,
        config=FAST,
        num_workers=1,
        show_progress=False,
    )
    assert second.mode == "domain"
    kept = read_exemplar_list(second.model_dir)
    assert kept["cases"] == listing["cases"][:1] and kept["inherited"] is True
