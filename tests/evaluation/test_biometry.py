"""Biometry: volumes in mL, the fetal head ellipse (HC, BPD, OFD), HC18 CSVs, agreement with a
reference, and ``medseg measure``. Ground truth by construction: rasterized ellipses of known
axes, label maps of known voxel counts, a hand-computed Bland-Altman table."""

from __future__ import annotations

import csv
import json
import math
import statistics

import numpy as np
import pytest
from conftest import shared_dataset
from scipy.special import ellipe
from skimage.measure import regionprops

from medseg import api
from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.evaluation.biometry import (
    BiometryReport,
    HeadMeasurement,
    case_key,
    compare_to_reference,
    label_volumes_ml,
    match_case,
    measure_folder,
    measure_head,
    ramanujan_circumference,
    read_pixel_sizes,
    read_reference_hc,
    render_head_overlay_png,
)
from medseg.io import Image, read_image, write_image

TOLERANCE = 0.005  # the 0.5 %


def ellipse_mask(shape, centre_mm, a_mm, b_mm, theta, spacing=(1.0, 1.0)) -> np.ndarray:
    """Pixels (x, y) whose centre lies inside the ellipse, all lengths in mm."""
    x, y = np.meshgrid(
        np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1], indexing="ij"
    )
    dx, dy = x - centre_mm[0], y - centre_mm[1]
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    return ((u / a_mm) ** 2 + (v / b_mm) ** 2 <= 1).astype(np.uint8)


def relative_error(value: float, truth: float) -> float:
    return abs(value - truth) / truth


def angle_difference(a: float, b: float) -> float:
    """Between two axis directions (period pi), in radians."""
    d = (a - b) % math.pi
    return min(d, math.pi - d)


# --- the ellipse fit ---


def test_ramanujan_matches_the_elliptic_integral():
    assert ramanujan_circumference(5.0, 5.0) == pytest.approx(2 * math.pi * 5.0, rel=1e-12)
    for a, b in ((2.0, 1.0), (100.0, 80.0), (60.0, 15.0)):
        exact = 4 * a * ellipe(1 - (b / a) ** 2)
        assert ramanujan_circumference(a, b) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(
    ("a", "b", "degrees"),
    [(30, 22, 0), (60, 45, 30), (120, 80, 75), (200, 150, 110), (95, 70, 160)],
)
def test_fit_recovers_a_rasterized_ellipse(a, b, degrees):
    theta = math.radians(degrees)
    shape = (int(2 * a + 40), int(2 * a + 30))
    centre = (shape[0] / 2 + 0.3, shape[1] / 2 - 0.2)
    mask = Image(ellipse_mask(shape, centre, a, b, theta), (1.0, 1.0))
    m = measure_head(mask)
    assert m is not None
    assert relative_error(m.semi_axis_a_mm, a) < TOLERANCE
    assert relative_error(m.semi_axis_b_mm, b) < TOLERANCE
    assert relative_error(m.hc_mm, ramanujan_circumference(a, b)) < TOLERANCE
    assert m.bpd_mm == pytest.approx(2 * m.semi_axis_b_mm)
    assert m.ofd_mm == pytest.approx(2 * m.semi_axis_a_mm)
    assert abs(m.center_x_mm - centre[0]) < 0.5 and abs(m.center_y_mm - centre[1]) < 0.5
    assert angle_difference(m.angle_rad, theta) < math.radians(1)
    assert 0 <= m.angle_rad < math.pi
    assert m.border_points_excluded == 0
    assert m.fit_rms_mm < 0.5


@pytest.mark.parametrize(
    ("centre", "a", "b", "degrees"),
    [((150, 30), 100, 70, 10), ((40, 120), 90, 65, 80), ((260, 180), 110, 80, 35)],
)
def test_fit_to_the_outline_survives_a_cut_by_the_image_border(centre, a, b, degrees):
    theta = math.radians(degrees)
    array = ellipse_mask((300, 220), centre, a, b, theta)
    m = measure_head(Image(array, (1.0, 1.0)))
    assert m is not None and m.border_points_excluded > 0
    truth = ramanujan_circumference(a, b)
    assert relative_error(m.semi_axis_a_mm, a) < TOLERANCE
    assert relative_error(m.semi_axis_b_mm, b) < TOLERANCE
    assert relative_error(m.hc_mm, truth) < TOLERANCE
    # the moments of the cut mask describe a smaller ellipse: that is why the outline is used
    props = regionprops(array)[0]
    moments_hc = ramanujan_circumference(props.axis_major_length / 2, props.axis_minor_length / 2)
    assert relative_error(moments_hc, truth) > 4 * TOLERANCE


@pytest.mark.parametrize("radius", [20.45, 30.0, 40.5])
def test_a_rasterized_circle_gives_its_circumference(radius):
    # 0.5 % holds from a radius of ~20 pixels; a smaller rasterized disk is itself uncertain
    # by ~0.1 pixel of radius (HC18's smallest heads have radii of ~100 pixels)
    x, y = np.meshgrid(np.arange(101), np.arange(101), indexing="ij")
    mask = ((x - 50) ** 2 + (y - 50) ** 2 <= radius**2).astype(np.uint8)
    m = measure_head(Image(mask, (1.0, 1.0)))
    assert relative_error(m.hc_mm, 2 * math.pi * radius) < TOLERANCE
    assert relative_error(m.semi_axis_b_mm, radius) < TOLERANCE


def test_hc_in_mm_scales_with_the_pixel_size():
    array = ellipse_mask((260, 200), (130, 100), 100, 75, math.radians(20))
    small = measure_head(Image(array, (0.1, 0.1)))
    large = measure_head(Image(array, (0.25, 0.25)))
    assert large.hc_mm / small.hc_mm == pytest.approx(2.5, rel=1e-9)
    assert large.bpd_mm / small.bpd_mm == pytest.approx(2.5, rel=1e-9)
    assert relative_error(small.hc_mm, ramanujan_circumference(10.0, 7.5)) < TOLERANCE
    assert small.pixel_size_mm == (0.1, 0.1)


def test_anisotropic_pixels_are_measured_in_mm():
    spacing = (0.1, 0.15)
    array = ellipse_mask((300, 200), (15.0, 15.0), 12.0, 9.0, math.radians(30), spacing)
    m = measure_head(Image(array, spacing))
    assert relative_error(m.semi_axis_a_mm, 12.0) < TOLERANCE
    assert relative_error(m.semi_axis_b_mm, 9.0) < TOLERANCE
    assert angle_difference(m.angle_rad, math.radians(30)) < math.radians(1)


def test_largest_component_with_holes_filled_and_empty_masks():
    array = ellipse_mask((200, 160), (100, 80), 70, 50, 0.3)
    array[95:105, 75:85] = 0  # a hole inside the head
    array[2:8, 2:8] = 1  # a speck elsewhere
    m = measure_head(Image(array * 255, (0.2, 0.2)))  # 0/255 masks count as one label
    assert relative_error(m.hc_mm, ramanujan_circumference(14.0, 10.0)) < TOLERANCE
    assert measure_head(Image(np.zeros((50, 40), np.uint8), (1.0, 1.0))) is None
    two = np.where(array > 0, 2, 0).astype(np.uint8)
    assert measure_head(Image(two, (1.0, 1.0)), label=1) is None
    with pytest.raises(MedsegError, match="2D"):
        measure_head(Image(np.zeros((4, 4, 4), np.uint8), (1.0, 1.0, 1.0)))


def test_head_measurement_round_trips_to_json():
    m = measure_head(Image(ellipse_mask((120, 100), (60, 50), 40, 30, 0.5), (0.1, 0.1)))
    data = json.loads(json.dumps(m.to_json()))
    assert HeadMeasurement.from_json(data) == m
    assert set(m.row()) >= {"hc_mm", "bpd_mm", "ofd_mm", "angle_rad", "center_x_mm"}


# --- volumes ---


def test_volumes_in_ml_equal_voxel_count_times_voxel_volume(tmp_path):
    spacing = (0.7, 1.1, 2.5)
    array = np.zeros((20, 18, 10), np.uint8)
    array[2:7, 3:7, 1:6] = 1  # 100 voxels
    array[10:11, 5:8, 2:5] = 2  # 9 voxels
    array[15, 15, 5] = 4  # 1 voxel
    write_image(Image(array, spacing), tmp_path / "case.nii.gz")
    image = read_image(tmp_path / "case.nii.gz")
    voxel_ml = 0.7 * 1.1 * 2.5 / 1000
    volumes = label_volumes_ml(image)
    assert volumes == pytest.approx(
        {"volume_ml_1": 100 * voxel_ml, "volume_ml_2": 9 * voxel_ml, "volume_ml_4": voxel_ml}
    )
    named = label_volumes_ml(image, {1: "left hippocampus", 3: "absent"})
    assert named == pytest.approx(
        {"volume_ml_left_hippocampus": 100 * voxel_ml, "volume_ml_absent": 0}
    )
    report = measure_folder(tmp_path / "case.nii.gz", tmp_path / "out")  # header spacing
    assert report.cases[0].spacing_source == "header"
    assert report.cases[0].measures["volume_ml_1"] == pytest.approx(100 * voxel_ml)
    rows = list(csv.DictReader((tmp_path / "out" / "measurements.csv").open()))
    assert float(rows[0]["volume_ml_2"]) == pytest.approx(9 * voxel_ml, rel=1e-5)


def test_areas_of_2d_images_are_in_square_mm():
    array = np.zeros((30, 20), np.uint8)
    array[5:15, 5:10] = 255  # 50 pixels of a 0/255 mask
    assert label_volumes_ml(Image(array, (0.2, 0.3))) == pytest.approx({"area_mm2_1": 50 * 0.06})


# --- pixel sizes: a PNG has none ---


def write_png(path, array) -> None:
    write_image(Image(np.asarray(array, np.uint8), (1.0, 1.0)), path)


def test_measure_refuses_a_png_without_pixel_size(tmp_path, capsys):
    png = tmp_path / "masks" / "001_HC.png"
    write_png(png, ellipse_mask((80, 60), (40, 30), 25, 20, 0) * 255)
    with pytest.raises(MedsegError, match="001_HC.png.*pixel size"):
        api.measure(png, tmp_path / "out", head=True)
    code = main(
        ["--quiet", "measure", str(tmp_path / "masks"), "-o", str(tmp_path / "out"), "--head"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "001_HC.png" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # a pixel size CSV without this case is refused too, naming the case
    sizes = tmp_path / "sizes.csv"
    sizes.write_text("filename,pixel_size_mm\n002_HC.png,0.1\n")
    with pytest.raises(MedsegError, match="001_HC.*sizes.csv"):
        api.measure(png, head=True, pixel_size_csv=sizes)
    with pytest.raises(MedsegError, match="pixel-size"):
        api.measure(png, pixel_size=0.0)


def test_a_2d_nifti_takes_its_pixel_size_from_the_header(tmp_path):
    array = ellipse_mask((200, 150), (20.0, 15.0), 15.0, 10.0, 0.2, (0.2, 0.2))
    write_image(Image(array, (0.2, 0.2)), tmp_path / "head.nii.gz")
    report = api.measure(tmp_path / "head.nii.gz", head=True)
    assert relative_error(report.cases[0].head.hc_mm, ramanujan_circumference(15, 10)) < TOLERANCE
    write_image(Image(np.ones((4, 4, 4), np.uint8), (1, 1, 1)), tmp_path / "v" / "v.nii.gz")
    with pytest.raises(MedsegError, match="v.nii.gz.*2D"):
        api.measure(tmp_path / "v", head=True)
    with pytest.raises(MedsegError, match="2D images"):
        api.measure(tmp_path / "v", pixel_size=0.5)


# --- CSVs, case names and the reference comparison ---


def test_hc18_and_two_column_csvs(tmp_path):
    hc18 = tmp_path / "pixel_size_and_HC.csv"
    hc18.write_text(
        "filename,pixel size(mm),head circumference (mm)\n000_HC.png,0.069,44.3\n010_2HC.png,0.08,72.87\n"
    )
    assert read_pixel_sizes(hc18) == {"000_HC.png": 0.069, "010_2HC.png": 0.08}
    assert read_reference_hc(hc18) == {"000_HC.png": 44.3, "010_2HC.png": 72.87}
    two = tmp_path / "sizes.csv"
    two.write_text("filename,pixel_size_mm\n000_HC,0.1\n")
    assert read_pixel_sizes(two) == {"000_HC": 0.1}
    with pytest.raises(MedsegError, match="head circumference"):
        read_reference_hc(two)
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,pixel_size_mm\n000_HC,abc\n")
    with pytest.raises(MedsegError, match=r"bad.csv:2"):
        read_pixel_sizes(bad)


def test_case_names_match_with_or_without_suffixes():
    keys = ["000_HC.png", "010_HC.png", "010_2HC.png"]
    assert case_key("000_HC_Annotation.png") == "000_hc"
    assert match_case("000_HC", keys) == "000_HC.png"
    assert match_case("000_HC_Annotation.png", keys) == "000_HC.png"
    assert match_case("000", keys) == "000_HC.png"
    assert match_case("010", keys) == "010_HC.png"
    assert match_case("010_2HC", keys) == "010_2HC.png"
    assert match_case("011", keys) is None


def test_reference_comparison_on_a_hand_made_table():
    measured = {"a_HC": 101.0, "b_HC": 98.0, "c_HC": 150.5, "d_HC": 203.0, "e_HC": math.nan, "z": 1}
    reference = {"a_HC.png": 100.0, "b_HC.png": 100.0, "c_HC.png": 150.0, "d_HC.png": 200.0}
    reference |= {"e_HC.png": 80.0, "f_HC.png": 90.0}
    result = compare_to_reference(measured, reference)
    errors = [1.0, -2.0, 0.5, 3.0]  # measured - reference
    absolute = [1.0, 2.0, 0.5, 3.0]
    assert result["n"] == 4
    assert result["cases"]["b_HC"] == {
        "measured_mm": 98.0,
        "reference_mm": 100.0,
        "error_mm": -2.0,
        "absolute_error_mm": 2.0,
    }
    assert result["mean_absolute_error_mm"] == pytest.approx(1.625)
    assert result["median_absolute_error_mm"] == pytest.approx(1.5)
    assert result["std_absolute_error_mm"] == pytest.approx(math.sqrt(3.6875 / 3))
    assert result["std_absolute_error_mm"] == pytest.approx(statistics.stdev(absolute))
    ba = result["bland_altman"]
    sd = math.sqrt(12.6875 / 3)  # sum of squared deviations from the mean 0.625, over n - 1
    assert sd == pytest.approx(statistics.stdev(errors))
    assert ba["mean_difference_mm"] == pytest.approx(0.625)
    assert ba["std_difference_mm"] == pytest.approx(sd)
    assert ba["loa_low_mm"] == pytest.approx(0.625 - 1.96 * sd)
    assert ba["loa_high_mm"] == pytest.approx(0.625 + 1.96 * sd)
    assert result["not_measured"] == ["e_HC"]
    assert result["no_reference"] == ["z"]
    assert result["missing"] == ["f_HC.png"]
    empty = compare_to_reference({}, reference)
    assert empty["n"] == 0 and empty["mean_absolute_error_mm"] is None


# --- the command ---


def test_measure_command_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    masks, images = tmp_path / "masks", tmp_path / "images"
    truths = {}
    sizes = ["filename,pixel_size_mm"]
    reference = ["filename,pixel size(mm),head circumference (mm)"]
    for i, (a, b, degrees, pixel) in enumerate(
        [(60, 45, 10, 0.1), (80, 55, 100, 0.12), (50, 48, 45, 0.2)]
    ):
        case = f"{i:03d}_HC"
        mask = ellipse_mask((200, 170), (100, 80 if i != 1 else 40), a, b, math.radians(degrees))
        write_png(masks / f"{case}.png", mask * 255)
        write_png(
            images / f"{case}{'_0000' if i == 2 else ''}.png",
            np.clip(60 + 120 * mask + rng.normal(0, 15, mask.shape), 0, 255),
        )
        truths[case] = ramanujan_circumference(a * pixel, b * pixel)
        sizes.append(f"{case}.png,{pixel}")
        reference.append(f"{case}.png,{pixel},{truths[case] + 1.0:.4f}")
    (tmp_path / "sizes.csv").write_text("\n".join(sizes) + "\n")
    (tmp_path / "ref.csv").write_text("\n".join(reference) + "\n")
    out = tmp_path / "out"
    args = ["--quiet", "measure", str(masks), "-o", str(out), "--head"]
    args += [
        "--pixel-size-csv",
        str(tmp_path / "sizes.csv"),
        "--reference",
        str(tmp_path / "ref.csv"),
    ]
    args += ["--images", str(images)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_cases"] == 3 and printed["reference_hc"]["n"] == 3

    rows = list(csv.DictReader((out / "measurements.csv").open()))
    assert [r["case"] for r in rows] == ["000_HC", "001_HC", "002_HC"]
    for row in rows:
        hc = float(row["hc_mm"])
        assert relative_error(hc, truths[row["case"]]) < TOLERANCE
        assert float(row["hc_error_mm"]) == pytest.approx(hc - truths[row["case"]] - 1.0, abs=1e-3)
        assert float(row["area_mm2_1"]) > 0 and row["spacing_source"].endswith("sizes.csv")
    assert int(rows[1]["border_points_excluded"]) > 0  # case 1 is cut by the border
    summary = json.loads((out / "summary.json").read_text())
    comparison = summary["reference_hc"]
    assert comparison["bland_altman"]["mean_difference_mm"] == pytest.approx(-1.0, abs=0.1)
    assert len(summary["cases"]) == 3 and summary["head"]["n_measured"] == 3
    assert summary["warnings"] == []  # every case found its image (002_HC as 002_HC_0000.png)
    again = BiometryReport.from_json(summary)  # summary.json round-trips
    assert again.cases[1].head == HeadMeasurement.from_json(summary["cases"][1]["head"])
    assert again.cases[1].head.border_points_excluded == int(rows[1]["border_points_excluded"])
    page = (out / "report.html").read_text()
    assert page.count("<img") == 4  # the Bland-Altman plot and one overlay per case
    assert "Bland-Altman" in page and "http" not in page.replace("http-equiv", "")

    assert main(args) == 2  # outputs exist
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_overlay_is_a_png():
    mask = Image(ellipse_mask((120, 100), (60, 20), 40, 30, 0.4) * 255, (0.1, 0.1))
    png = render_head_overlay_png(mask, measure_head(mask), title="case")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert render_head_overlay_png(mask, None).startswith(b"\x89PNG")


# --- HC18: the reference masks against the reference HC ---


@pytest.mark.integration
def test_hc18_reference_masks_agree_with_the_reference_hc():
    root = shared_dataset("HC18_fetal_head_US")
    csv_path = root / "pixel_size_and_HC.csv"
    report = api.measure(root / "masks", reference=csv_path)
    comparison = report.summary["reference_hc"]
    print(
        f"HC18 reference masks, {comparison['n']} cases: mean absolute HC error "
        f"{comparison['mean_absolute_error_mm']:.3f} mm, bias "
        f"{comparison['bland_altman']['mean_difference_mm']:+.3f} mm"
    )
    assert comparison["n"] == len(list((root / "masks").glob("*.png")))
    assert comparison["mean_absolute_error_mm"] < 2.0
