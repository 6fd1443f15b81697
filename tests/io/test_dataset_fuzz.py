"""Property-based fuzzing of the dataset.json parser: any JSON gives a dataset or a MedsegError.

Crashes found here became fixes in medseg.io.dataset and the regression cases below.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.errors import MedsegError
from medseg.io.dataset import load_dataset

SCALARS = st.none() | st.booleans() | st.integers(-3, 300) | st.floats() | st.text(max_size=12)
JSON = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=12,
)
KEYS = ["labels", "channel_names", "modality", "training", "file_ending", "name", "numTraining"]
DATASET_JSON = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6) | JSON


def write_dataset(root, meta) -> None:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "imagesTr" / "case_0000.nii.gz").write_bytes(b"")
    (root / "labelsTr" / "case.nii.gz").write_bytes(b"")
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (root / "dataset.json").write_text(text)


def load_only_medseg_errors(root) -> None:
    try:
        load_dataset(root)
    except MedsegError as exc:
        assert "\n" not in str(exc)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(meta=DATASET_JSON)
def test_any_dataset_json_gives_a_dataset_or_a_medseg_error(tmp_path_factory, meta):
    root = tmp_path_factory.mktemp("ds")
    write_dataset(root, meta)
    load_only_medseg_errors(root)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=200))
def test_any_bytes_give_a_dataset_or_a_medseg_error(tmp_path_factory, raw):
    root = tmp_path_factory.mktemp("ds")
    write_dataset(root, {})
    (root / "dataset.json").write_bytes(raw)
    load_only_medseg_errors(root)


GOOD = {"labels": {"0": "background", "1": "organ"}, "modality": {"0": "CT"}}


@pytest.mark.parametrize(
    ("meta", "needle"),
    [  # crashes hypothesis found (ValueError, AttributeError), and a path escape
        ({**GOOD, "modality": {"": "CT"}}, "channel keys must be numbers"),
        ({**GOOD, "modality": {"²": "CT"}}, "channel keys must be numbers"),
        ({**GOOD, "labels": {"--1": "x"}}, "cannot read label entry"),
        ({**GOOD, "labels": {"a": True}}, "cannot read label entry"),
        ({**GOOD, "training": [1]}, "entries must be objects"),
        ({**GOOD, "training": [{"image": "../../etc/passwd"}]}, "outside the dataset"),
        ({**GOOD, "training": [{"image": "/etc/passwd"}]}, "outside the dataset"),
        ({**GOOD, "file_ending": "/../x"}, "file_ending"),
    ],
)
def test_fuzz_regressions(tmp_path, meta, needle):
    write_dataset(tmp_path, meta)
    with pytest.raises(MedsegError, match=needle):
        load_dataset(tmp_path)
