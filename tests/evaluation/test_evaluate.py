"""Tests of the evaluation stage: metrics, per-case rows, summaries, files and the HTML report."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.evaluation import (
    EvaluationReport,
    compute_dice,
    compute_iou,
    confusion_counts,
    evaluate_folders,
    evaluate_pairs,
    save_overlay_png,
    worst_cases,
    write_evaluation,
    write_html_report,
)
from medseg.evaluation.metrics import label_overlaps
from medseg.evaluation.report import _panels
from medseg.io.files import write_image
from medseg.io.image import Image

SPACING = (1.0, 1.5, 2.0)


def cube(shape: tuple[int, ...], start: int, stop: int, value: int = 1) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[tuple(slice(start, stop) for _ in shape)] = value
    return array


def label_image(array: np.ndarray, spacing: tuple[float, ...] = SPACING) -> Image:
    return Image(array, spacing[: array.ndim])


# ---------------------------------------------------------------- metrics


def test_hand_computed_counts_dice_and_iou():
    pred = np.array([[1, 1, 0, 2], [0, 2, 2, 2]])
    ref = np.array([[1, 0, 0, 2], [1, 2, 0, 0]])
    # label 1: pred {(0,0),(0,1)}, ref {(0,0),(1,0)} -> tp 1, fp 1, fn 1, tn 5
    assert confusion_counts(pred, ref, 1) == (1, 1, 1, 5)
    # label 2: pred {(0,3),(1,1),(1,2),(1,3)}, ref {(0,3),(1,1)} -> tp 2, fp 2, fn 0
    assert confusion_counts(pred, ref, 2) == (2, 2, 0, 4)
    dice = compute_dice(pred, ref, labels=[1, 2])
    iou = compute_iou(pred, ref, labels={1: "a", 2: "b"})
    assert dice == {1: pytest.approx(2 / 4), 2: pytest.approx(4 / 6)}
    assert iou == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 4)}


def test_two_cubes_dice_is_exact():
    shape = (20, 20, 20)
    a, b = cube(shape, 2, 10), cube(shape, 5, 13)  # 8^3 each, overlap 5^3
    inter, size_a, size_b = 5**3, 8**3, 8**3
    assert int(a.sum()) == size_a and int((a & b).sum()) == inter
    assert compute_dice(a, b, labels=[1])[1] == 2 * inter / (size_a + size_b)
    assert compute_iou(a, b, labels=[1])[1] == inter / (size_a + size_b - inter)
    # Dice and IoU are tied by D = 2J / (1 + J)
    j = compute_iou(a, b, labels=[1])[1]
    assert compute_dice(a, b, labels=[1])[1] == pytest.approx(2 * j / (1 + j))


def test_empty_mask_conventions():
    empty = np.zeros((4, 4), dtype=np.uint8)
    full = np.ones((4, 4), dtype=np.uint8)
    assert math.isnan(compute_dice(empty, empty, labels=[1])[1])
    assert math.isnan(compute_iou(empty, empty, labels=[1])[1])
    assert compute_dice(empty, full, labels=[1])[1] == 0.0  # prediction empty, reference not
    assert compute_dice(full, empty, labels=[1])[1] == 0.0  # reference empty, prediction not
    assert compute_iou(full, empty, labels=[1])[1] == 0.0


@pytest.mark.parametrize("offset", [0, -3, 2000])
def test_one_pass_overlaps_match_per_label_counts(offset):
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 4, size=(9, 8, 7)) + offset
    ref = rng.integers(0, 4, size=(9, 8, 7)) + offset
    values = [offset + v for v in range(5)]  # the last one is absent from both
    overlaps = label_overlaps(pred, ref, values)
    for value in values:
        tp, fp, fn, _ = confusion_counts(pred, ref, value)
        assert overlaps[value] == (tp, tp + fp, tp + fn)


# ---------------------------------------------------------------- evaluate_pairs


def test_evaluate_pairs_rows_flags_and_summary():
    shape = (12, 12, 12)
    ref_a = cube(shape, 1, 5) + cube(shape, 7, 11, value=2)  # 4^3 of each label
    pred_a = cube(shape, 1, 5)  # label 2 missed entirely
    ref_b = cube(shape, 2, 6)  # label 2 absent from both
    pred_b = cube(shape, 3, 6)  # 3^3 inside the reference 4^3
    report = evaluate_pairs(
        [
            ("a", label_image(pred_a), label_image(ref_a)),
            ("b", label_image(pred_b), label_image(ref_b)),
        ],
        labels={0: "background", 1: "liver", 2: "tumour"},
    )
    assert report.labels == ((1, "liver"), (2, "tumour"))
    rows = {(r.case_id, r.label): r for r in report.cases}
    assert len(rows) == 4
    assert rows["a", 1].dice == 1.0 and rows["a", 1].tp == 64
    assert rows["a", 2].dice == 0.0 and rows["a", 2].fn == 64
    assert rows["a", 2].empty_prediction and not rows["a", 2].empty_reference
    assert rows["b", 1].dice == 2 * 27 / (27 + 64)
    assert rows["b", 1].reference_volume_mm3 == 64 * 1.0 * 1.5 * 2.0
    empty = rows["b", 2]
    assert math.isnan(empty.dice) and math.isnan(empty.iou)
    assert empty.empty_reference and empty.empty_prediction

    liver, tumour = report.summary["per_class"]["1"], report.summary["per_class"]["2"]
    assert liver["dice"]["mean"] == pytest.approx((1.0 + 54 / 91) / 2)
    assert liver["dice"]["min"] == pytest.approx(54 / 91) and liver["dice"]["max"] == 1.0
    # NaN is ignored in the statistics, but the empty case is counted
    assert tumour["dice"]["mean"] == 0.0 and tumour["n_scored"] == 1
    assert tumour["n_empty_reference"] == 1 and tumour["n_both_empty"] == 1
    assert report.summary["n_cases"] == 2
    assert report.summary["mean_foreground_dice"] == pytest.approx(
        (liver["dice"]["mean"] + 0.0) / 2
    )
    assert report.mean_dice_per_case()["b"] == rows["b", 1].dice  # NaN class left out


def test_evaluate_pairs_rejects_mismatched_geometry_naming_the_case():
    ref = label_image(cube((6, 6, 6), 1, 4))
    moved = Image(ref.array, ref.spacing, origin=(0.0, 0.0, 0.01))
    close = Image(ref.array, ref.spacing, origin=(0.0, 0.0, 0.0005))
    assert evaluate_pairs([("ok", close, ref)], labels={1: "x"}).cases[0].dice == 1.0
    with pytest.raises(MedsegError, match=r"case shifted\b.*origin"):
        evaluate_pairs([("ok", close, ref), ("shifted", moved, ref)], labels={1: "x"})
    with pytest.raises(MedsegError, match=r"case small\b.*shape"):
        evaluate_pairs(
            [("small", label_image(np.zeros((5, 6, 6), np.uint8)), ref)], labels={1: "x"}
        )


def test_non_integer_label_values_are_refused():
    ref = label_image(cube((4, 4), 0, 2))
    pred = ref.with_array(ref.array.astype(np.float32) * 0.5)
    with pytest.raises(MedsegError, match="case c prediction.*integers"):
        evaluate_pairs([("c", pred, ref)], labels={1: "x"})


def test_report_json_round_trip():
    pairs = [("c", label_image(np.zeros((4, 4), np.uint8)), label_image(cube((4, 4), 0, 2)))]
    report = evaluate_pairs(pairs, labels=[(1, "a"), (2, "b")])
    # nnU-Net v2's {name: value} mapping means the same labels
    assert evaluate_pairs(pairs, labels={"background": 0, "a": 1, "b": 2}).labels == report.labels
    data = report.to_json()
    text = json.dumps(data, allow_nan=False)  # strict JSON: NaN became null
    again = EvaluationReport.from_json(json.loads(text))
    assert again.to_json() == data
    assert again.labels == report.labels
    assert math.isnan(again.cases[1].dice) and again.cases[1].empty_reference
    assert again.cases[0] == report.cases[0]


# ---------------------------------------------------------------- folders


def write_pairs(tmp_path, cases: dict[str, tuple[np.ndarray, np.ndarray]]):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    for case_id, (pred, ref) in cases.items():
        write_image(label_image(pred), pred_dir / f"{case_id}.nii.gz")
        write_image(label_image(ref), ref_dir / f"{case_id}.nii.gz")
    return pred_dir, ref_dir


@pytest.fixture
def folder_pairs(tmp_path):
    shape = (10, 10, 10)
    ref = cube(shape, 1, 5) + cube(shape, 6, 9, value=2)  # 64 and 27 voxels
    cases = {
        "case_good": (ref.copy(), ref),
        "case_bad": (cube(shape, 3, 5), ref),
        "case_mid": (cube(shape, 1, 4) + cube(shape, 6, 9, value=2), ref),
    }
    return (*write_pairs(tmp_path, cases), cases)


def test_evaluate_folders_writes_csv_summary_and_report(tmp_path, folder_pairs):
    pred_dir, ref_dir, cases = folder_pairs
    write_image(label_image(cube((10, 10, 10), 0, 2)), pred_dir / "extra_case.nii.gz")
    out = tmp_path / "out"
    report = evaluate_folders(pred_dir, ref_dir, output_dir=out)

    assert report.labels == ((1, "label_1"), (2, "label_2"))  # union of the values found
    assert report.case_ids == ("case_bad", "case_good", "case_mid")
    assert "extra_case" in report.summary["warnings"][0]
    assert report.summary["extra_predictions"] == ["extra_case"]

    expected = {
        (case_id, label): compute_dice(pred, ref, labels=[label])[label]
        for case_id, (pred, ref) in cases.items()
        for label in (1, 2)
    }
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2
    for row in rows:
        assert float(row["dice"]) == pytest.approx(expected[row["case_id"], int(row["label"])])
        pred, ref = cases[row["case_id"]]
        assert int(row["reference_voxels"]) == int((ref == int(row["label"])).sum())
        assert float(row["predicted_volume_mm3"]) == pytest.approx(
            (pred == int(row["label"])).sum() * np.prod(SPACING)
        )
    summary = json.loads((out / "summary.json").read_text())
    label_1 = [expected[c, 1] for c in cases]
    assert summary["per_class"]["1"]["dice"]["mean"] == pytest.approx(np.mean(label_1))
    assert summary["per_class"]["1"]["dice"]["median"] == pytest.approx(np.median(label_1))
    assert summary["per_class"]["1"]["dice"]["std"] == pytest.approx(np.std(label_1))
    assert summary["per_class"]["1"]["dice"]["p25"] == pytest.approx(np.percentile(label_1, 25))
    assert summary["per_class"]["2"]["n_empty_reference"] == 0
    assert summary["mean_foreground_dice"] == pytest.approx(
        (np.mean(label_1) + np.mean([expected[c, 2] for c in cases])) / 2
    )
    html = (out / "report.html").read_text()
    assert "case_bad" in html and "data:image/png;base64" in html


def test_evaluate_folders_lists_missing_predictions(tmp_path, folder_pairs):
    pred_dir, ref_dir, _ = folder_pairs
    (pred_dir / "case_mid.nii.gz").unlink()
    (pred_dir / "case_bad.nii.gz").unlink()
    with pytest.raises(MedsegError, match="2 reference case.*case_bad, case_mid"):
        evaluate_folders(pred_dir, ref_dir)


def test_evaluate_folders_geometry_mismatch_names_the_case(tmp_path, folder_pairs):
    pred_dir, ref_dir, cases = folder_pairs
    pred = cases["case_mid"][0]
    write_image(Image(pred, (1.0, 1.5, 2.5)), pred_dir / "case_mid.nii.gz", overwrite=True)
    with pytest.raises(MedsegError, match=r"case case_mid\b.*spacing"):
        evaluate_folders(pred_dir, ref_dir)


def test_refuses_to_overwrite_outputs(tmp_path, folder_pairs):
    pred_dir, ref_dir, _ = folder_pairs
    report = evaluate_folders(pred_dir, ref_dir, labels={1: "a", 2: "b"})
    out = tmp_path / "out"
    csv_path, json_path = write_evaluation(report, out)
    json_path.write_text("{}")
    with pytest.raises(MedsegError, match="already exists"):
        write_evaluation(report, out)
    assert json_path.read_text() == "{}"  # untouched after the refusal
    with pytest.raises(MedsegError, match="already exists"):
        evaluate_folders(pred_dir, ref_dir, output_dir=out)
    write_evaluation(report, out, overwrite=True)
    assert json.loads(json_path.read_text())["labels"] == {"1": "a", "2": "b"}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "summary.json"]  # no temp left


def test_labels_from_dataset_json_float_maps_and_255_png(tmp_path):
    ref_dir, pred_dir = tmp_path / "dataset" / "labelsTr", tmp_path / "pred"
    mask = cube((8, 6), 1, 4)  # 3x3 square
    write_image(Image(mask * 255, (0.5, 0.5)), ref_dir / "img_1.png")  # 0/255 PNG reference
    write_image(Image(mask.astype(np.float32), (0.5, 0.5)), pred_dir / "img_1.nii.gz")  # float map
    (tmp_path / "dataset" / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "head": 1}})  # nnU-Net v2 style
    )
    report = evaluate_folders(pred_dir, ref_dir)
    assert report.labels == ((1, "head"),)
    assert report.cases[0].dice == 1.0 and report.cases[0].reference_voxels == 9
    assert report.cases[0].reference_volume_mm3 == pytest.approx(9 * 0.25)
    assert report.summary["warnings"] == []


# ---------------------------------------------------------------- report


def test_html_report_is_self_contained_and_shows_worst_cases(tmp_path):
    shape = (16, 14, 8)
    ref = cube(shape, 3, 8) + cube(shape, 9, 13, value=2)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    pairs, images = [], {}
    for i in range(7):
        pred = ref.copy()
        pred[: 2 + i] = 0  # worse overlap for smaller i
        pairs.append((f"case_{i:02d}", label_image(pred), label_image(ref)))
        images[f"case_{i:02d}"] = label_image(image)
    report = evaluate_pairs(pairs, labels={1: "a", 2: "b"})
    assert worst_cases(report) == [f"case_{i:02d}" for i in (6, 5, 4, 3, 2)]

    curves = tmp_path / "curves.png"
    save_overlay_png(None, label_image(ref[:, :, 4]), label_image(ref[:, :, 4]), curves)
    out = write_html_report(
        report,
        tmp_path / "report" / "report.html",
        images=images,
        predictions={c: p for c, p, _ in pairs},
        references={c: r for c, _, r in pairs},
        curves_png=curves,
        title="demo <run>",
        extra_sections=[("Notes", "<p>extra notes here</p>")],
    )
    text = out.read_text()
    uris = re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", text)
    # metric distributions, Bland-Altman, curves, five overlays
    assert len(uris) == 1 + 1 + 1 + 5
    stripped = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http" not in stripped and "src='" not in stripped.replace("src=''", "")
    for case_id in ("case_06", "case_05", "case_02"):
        assert f"<figcaption>{case_id}: mean Dice" in text
    assert "<figcaption>case_01:" not in text  # only the five worst get a figure
    assert "demo &lt;run&gt;" in text and "extra notes here" in text


def test_overlay_png_2d_and_display_orientation(tmp_path):
    ref = label_image(cube((30, 20), 5, 15))
    path = save_overlay_png(
        label_image(np.arange(600.0).reshape(30, 20)), ref, ref, tmp_path / "o.png"
    )
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # (x, y, z) arrays: x runs horizontally, superior (high z) is at the top of side views
    image = np.zeros((6, 4, 3))
    image[5, 0, 2] = 1.0  # x = 5, y = 0, z = 2
    panels = _panels(image, image > 0, image > 0, (1.0, 1.0, 3.0))
    names = [p[0].split()[0] for p in panels]
    assert names == ["axial", "coronal", "sagittal"]
    axial, coronal, sagittal = (p[1] for p in panels)
    assert axial.shape == (4, 6) and axial[0, 5] == 1.0  # row y = 0, column x = 5
    assert coronal.shape == (3, 6) and coronal[0, 5] == 1.0  # top row is z = 2
    assert sagittal.shape == (3, 4) and sagittal[0, 0] == 1.0
    assert [p[4] for p in panels] == [1.0, 3.0, 3.0]  # pixel aspect from the spacing
