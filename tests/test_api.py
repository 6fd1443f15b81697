"""medseg.api is a typed facade: positional parameters are the paths (and what they hold), every
option is keyword-only, and the names mean the same thing everywhere."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from medseg import api, workflow
from medseg.errors import MedsegError
from medseg.io.dataset import load_dataset
from medseg.io.phantoms import write_phantom_dataset

# What a positional parameter may be: a path, or the object the step works on.
POSITIONAL = {
    "dataset",
    "images",
    "work_dir",
    "model_dir",
    "model_dirs",
    "input_path",
    "output_dir",
    "output_path",
    "output_json",
    "pred_dir",
    "ref_dir",
    "fixed",
    "moving",
    "target",
    "atlases",
    "source",
    "path",
    "method",
    "name",
    "pred",
    "ref",
    "spec",
    "case_ids",
    "folder",
}


@pytest.mark.parametrize("name", api.__all__)
def test_api_functions_are_typed_and_keyword_only_after_the_paths(name: str):
    function = getattr(api, name)
    signature = inspect.signature(function)
    assert signature.return_annotation is not inspect.Signature.empty, name
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            continue
        assert parameter.annotation is not inspect.Parameter.empty, (name, parameter.name)
        if parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
            assert parameter.name in POSITIONAL, (name, parameter.name)
        else:
            assert parameter.kind is parameter.KEYWORD_ONLY, (name, parameter.name)
    assert function.__doc__, name


def test_api_has_no_private_helpers():
    assert not [n for n, v in vars(api).items() if n.startswith("_") and inspect.isfunction(v)]


@pytest.fixture
def spec(tmp_path):
    return load_dataset(write_phantom_dataset(tmp_path / "data", num_train=4, num_test=0))


def test_make_splits_checks_the_cases_and_records_the_folds(spec, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    folds = workflow.make_splits(spec, model_dir, num_folds=2, seed=0, split_file=None)
    assert len(folds) == 2 and json.loads((model_dir / "splits.json").read_text()) == folds
    # An existing splits.json is read back, not redrawn.
    assert workflow.make_splits(spec, model_dir, num_folds=4, seed=1, split_file=None) == folds
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["nope"], "val": [spec.cases[0].case_id]}))
    with pytest.raises(MedsegError, match="unknown case"):
        workflow.make_splits(spec, model_dir, num_folds=2, seed=0, split_file=bad)


def test_link_cases_links_images_and_labels(spec, tmp_path):
    ids = [c.case_id for c in spec.cases[:2]]
    images, labels = api.link_cases(spec, ids, tmp_path / "links")
    assert sorted(p.name.split(".")[0] for p in labels.iterdir()) == sorted(ids)
    assert all(p.is_symlink() and p.resolve().exists() for p in images.iterdir())
    assert Path(next(images.iterdir())).parent == tmp_path / "links" / "images"
