"""Splitting one dataset into sites."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.federated.simulate import split_sites
from medseg.io import Image, write_image
from medseg.io.dataset import load_dataset


def test_a_seeded_split_covers_every_case_once(phantom_dataset):
    spec = load_dataset(phantom_dataset)
    groups = split_sites(spec, sites=3, split_by="7")
    ids = sorted(i for g in groups.values() for i in g)
    assert ids == sorted(c.case_id for c in spec.cases if c.label)
    assert max(map(len, groups.values())) - min(map(len, groups.values())) <= 1
    assert split_sites(spec, sites=3, split_by="7") == groups
    with pytest.raises(MedsegError):
        split_sites(spec, sites=99, split_by="0")


def test_split_by_image_data_type_and_by_a_file(tmp_path):
    root = tmp_path / "d"
    for i in range(6):
        dtype = np.uint8 if i < 2 else np.float32
        array = np.full((4, 4, 4), i, dtype=dtype)
        write_image(Image(array, (1.0, 1.0, 1.0)), root / "imagesTr" / f"c{i}_0000.nii.gz")
        write_image(
            Image(np.zeros((4, 4, 4), np.uint8), (1.0, 1.0, 1.0)),
            root / "labelsTr" / f"c{i}.nii.gz",
        )
    (root / "dataset.json").write_text(
        json.dumps({"name": "t", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "x": 1},
                    "file_ending": ".nii.gz", "numTraining": 6})
    )  # fmt: skip
    spec = load_dataset(root)
    groups = split_sites(spec, sites=2, split_by="dtype")
    assert groups["site1_uint8"] == ["c0", "c1"]
    assert sorted(groups["site2"]) == ["c2", "c3", "c4", "c5"]
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({f"c{i}": "left" if i % 2 else "right" for i in range(6)}))
    by_file = split_sites(spec, sites=2, split_by=str(mapping))
    assert by_file["left"] == ["c1", "c3", "c5"]
