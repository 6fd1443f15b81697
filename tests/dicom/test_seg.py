"""DICOM series reading with checks, DICOM SEG round trips (highdicom, dciodvfy), codes, de-identification."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.dicom import dciodvfy_errors

from medseg.dicom import (
    code_for_label,
    read_seg_labels,
    read_series,
    write_seg,
)
from medseg.errors import MedsegError


def test_seg_round_trip_is_voxel_exact_and_valid(series_dir, tmp_path):
    import highdicom as hd

    folder, _, ball = series_dir
    series = read_series(folder)
    label = ball.copy()
    label[:4, :4, :3] = 3  # a second label, value 3: segments are numbered 1..N
    out = write_seg(
        series.image.with_array(label),
        series,
        tmp_path / "seg.dcm",
        labels={1: "liver", 3: "tumour"},
        model_name="tiny-unet",
    )
    assert dciodvfy_errors(out) == []
    back, names = read_seg_labels(out, series)
    assert names == {1: "liver", 2: "tumour"}
    assert np.array_equal(back.array, np.where(label == 3, 2, label))
    seg = hd.seg.segread(str(out))
    liver, tumour = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED-CT Liver
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algo = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "tiny-unet" and algo.AlgorithmVersion.startswith("medseg")
    refs = {
        r.ReferencedSOPInstanceUID
        for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert refs == {str(ds.SOPInstanceUID) for ds in series.datasets}
    assert seg.StudyInstanceUID == series.study_uid
    with pytest.raises(MedsegError, match="already exists"):
        write_seg(series.image.with_array(label), series, out, labels={1: "liver"})


def test_label_codes_table_and_fallback(tmp_path):
    assert code_for_label("kidney_left").type[1] == "64033007"
    assert code_for_label("Fetal head").type[2] == "Head"
    assert code_for_label("unheard-of blob").source == "fallback"
    table = tmp_path / "codes.json"
    table.write_text(
        '{"blob": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}}'
    )
    from medseg.dicom import load_code_table

    assert code_for_label("blob", load_code_table(table)).type[1] == "10200004"
    table.write_text('{"blob": {"type": "liver"}}')
    with pytest.raises(MedsegError, match="blob"):
        load_code_table(table)
