"""Untrusted model folders: JSON checked against a schema, weights checked against their SHA-256.

(The pickle payload that must never run is in tests/test_model_folder.py.)
"""

from __future__ import annotations

import json

import pytest
from helpers.inference import make_model_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.errors import MedsegError
from medseg.model_folder import ModelFolder, file_sha256, read_weights, weights_path
from medseg.schema import (
    PLAN_SCHEMA,
    WEIGHTS_METADATA_SCHEMA,
    SchemaError,
    check_plan_json,
    schema_problems,
)


@pytest.fixture
def model_dir(tmp_path):
    return make_model_dir(tmp_path)


def edit_plan(model_dir, change):
    plan = json.loads((model_dir / "plan.json").read_text())
    change(plan)
    (model_dir / "plan.json").write_text(json.dumps(plan))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda p: p.update(ndim="3"), "$.ndim: expected integer"),
        (lambda p: p["network"].update(features=[10**9, 8]), "$.network.features[0]"),
        (lambda p: p.update(patch_size=[16, 16, 10**6]), "$.patch_size[2]"),
        (lambda p: p.update(target_spacing=[1.0, 0.0, 1.0]), "$.target_spacing[1]"),
        (lambda p: p.pop("labels"), "missing 'labels'"),
        (lambda p: p["network"].update(name="../../evil"), "$.network.name"),
        (lambda p: p.update(patch_size=[16, 16]), "2 values for a 3D plan"),
        (lambda p: p.update(labels=[[0, "a"], [0, "b"]]), "appears twice"),
    ],
)
def test_plan_that_breaks_the_schema_is_refused(model_dir, change, needle):
    edit_plan(model_dir, change)
    with pytest.raises(SchemaError) as info:
        ModelFolder.open(model_dir)
    message = str(info.value)
    assert str(model_dir / "plan.json") in message and needle in message and "\n" not in message


def test_plan_with_nan_spacing_is_refused(model_dir):
    text = (
        (model_dir / "plan.json")
        .read_text()
        .replace('"target_spacing": [1.0', '"target_spacing": [NaN')
    )
    (model_dir / "plan.json").write_text(text)
    with pytest.raises(SchemaError, match=r"target_spacing\[0\]: expected number"):
        check_plan_json(model_dir / "plan.json")


def test_not_json_and_too_deep_json_are_refused(model_dir):
    (model_dir / "plan.json").write_text("{" * 100000)
    with pytest.raises(SchemaError, match="not valid JSON"):
        ModelFolder.open(model_dir)


def test_weights_checksum_is_recorded_and_checked(model_dir):
    fold = model_dir / "fold_0"
    path = weights_path(fold, "best")
    metadata = json.loads(path.with_suffix(".json").read_text())
    assert metadata["sha256"] == file_sha256(path)
    read_weights(fold, "best")  # intact: fine
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(MedsegError, match="checksum mismatch") as info:
        ModelFolder.open(model_dir).load_networks()
    assert str(path) in str(info.value)


def test_weights_metadata_is_schema_checked(model_dir):
    sidecar = model_dir / "fold_0" / "weights_best.json"
    metadata = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**metadata, "network": "x; rm -rf /"}))
    with pytest.raises(SchemaError, match=r"\$\.network"):
        read_weights(model_dir / "fold_0", "best")
    sidecar.write_text(json.dumps({**metadata, "sha256": "not-hex"}))
    with pytest.raises(SchemaError, match=r"\$\.sha256"):
        read_weights(model_dir / "fold_0", "best")


def test_folder_without_checksums_still_loads(model_dir):
    sidecar = model_dir / "fold_0" / "weights_best.json"
    metadata = json.loads(sidecar.read_text())
    del metadata["sha256"]  # written before checksums were recorded
    sidecar.write_text(json.dumps(metadata))
    assert len(ModelFolder.open(model_dir).load_networks()) == 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(value=JSON | st.fixed_dictionaries({k: JSON for k in PLAN_SCHEMA["required"]}))
def test_validator_never_crashes_on_any_json(value):
    # property: any JSON value gives a list of problem lines, never an exception
    for schema in (PLAN_SCHEMA, WEIGHTS_METADATA_SCHEMA):
        problems = schema_problems(value, schema)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
