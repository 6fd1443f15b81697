"""Exemplar choice and storage: at most K cases, listed, read back without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.continual.exemplars import (
    EXEMPLARS_DIR,
    load_exemplars,
    read_exemplar_list,
    select_exemplars,
    store_exemplars,
)
from medseg.errors import MedsegError
from medseg.preprocessing.preprocess import LoadedCase


def _case(cid: str, volume: int, level: float) -> LoadedCase:
    label = np.zeros((8, 8, 8), np.int16)
    label.flat[:volume] = 1
    data = (
        np.full((1, 8, 8, 8), level, np.float32)
        + np.arange(512, dtype=np.float32).reshape(1, 8, 8, 8) * 1e-3
    )
    return LoadedCase(cid, data, label, None, {})


def _write(folder, case: LoadedCase) -> None:
    np.save(folder / f"{case.case_id}_data.npy", case.data)
    np.save(folder / f"{case.case_id}_seg.npy", case.label)
    geometry = {
        "shape": [8, 8, 8],
        "spacing": [1, 1, 1],
        "origin": [0, 0, 0],
        "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
        "bbox": [[0, 8]] * 3,
        "resampled_shape": [8, 8, 8],
    }
    (folder / f"{case.case_id}.json").write_text(
        json.dumps({"case_id": case.case_id, "geometry": geometry})
    )


def test_selection_respects_k_and_covers_the_spread():
    # two tight clusters and one outlier: k-center takes one of each
    cases = [_case(f"a{i}", 50 + i, 1.0) for i in range(4)]
    cases += [_case(f"b{i}", 200 + i, 5.0) for i in range(4)]
    cases += [_case("odd", 400, 9.0)]
    chosen = select_exemplars(cases, 3, num_classes=2)
    assert len(chosen) == 3
    assert {c[0] for c in chosen} == {"a", "b", "o"}
    assert select_exemplars(cases, 0, num_classes=2) == []
    assert len(select_exemplars(cases[:2], 5, num_classes=2)) == 2


def test_storage_refuses_more_than_k_and_reads_back(tmp_path):
    source = tmp_path / "pre"
    source.mkdir()
    cases = [_case(f"c{i}", 10 * (i + 1), float(i)) for i in range(3)]
    for c in cases:
        _write(source, c)
    model = tmp_path / "model"
    with pytest.raises(MedsegError, match="at most 2"):
        store_exemplars(model, source, ["c0", "c1", "c2"], k=2, origin={})
    store_exemplars(model, source, ["c0", "c2"], k=2, origin={"dataset": "old"})
    listing = read_exemplar_list(model)
    assert listing["cases"] == ["c0", "c2"] and listing["k"] == 2 and listing["dataset"] == "old"
    assert len(list((model / EXEMPLARS_DIR).iterdir())) == 6
    back = load_exemplars(model)
    assert [c.case_id for c in back] == ["c0", "c2"]
    np.testing.assert_array_equal(back[1].label, cases[2].label)
    assert read_exemplar_list(tmp_path) is None
