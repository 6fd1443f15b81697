"""``medseg predict --measure``: millimetres only with a pixel size, measured after predicting."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
from helpers.cli import run_cli
from helpers.distillation import FAST

from medseg import api
from medseg.evaluation.biometry import measure_head, with_pixel_size
from medseg.io import read_image


@pytest.fixture(scope="module")
def disk_model(disk_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("disk_model")
    config = replace(FAST, max_epochs=2, iterations_per_epoch=10, learning_rate=0.02)
    api.train(disk_dataset, work, config=config, show_progress=False)
    return work / "model"


def test_predict_measure_refuses_pngs_without_pixel_size_before_predicting(
    disk_model, disk_dataset, tmp_path
):
    out = tmp_path / "out"
    proc = run_cli(
        "predict", str(disk_model), str(disk_dataset / "images"), "-o", str(out), "--measure"
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ".png" in lines[0] and "pixel size" in lines[0]
    assert not out.exists() or not any(out.glob("*.png"))  # nothing was predicted
    # a measurement option without --measure is a mistake too
    proc = run_cli(
        "predict", str(disk_model), str(disk_dataset / "images"), "-o", str(out), "--head"
    )
    assert proc.returncode != 0 and "--head needs --measure" in proc.stderr


def test_predict_measure_writes_hc_in_mm_from_a_pixel_size_csv(disk_model, disk_dataset, tmp_path):
    sizes = {f"case_{i:02d}.png": 0.1 + 0.02 * i for i in range(10)}
    table = tmp_path / "pixel_size.csv"
    table.write_text("filename,pixel size(mm)\n" + "".join(f"{k},{v}\n" for k, v in sizes.items()))
    out = tmp_path / "out"
    proc = run_cli(
        "predict",
        str(disk_model),
        str(disk_dataset / "images"),
        "-o",
        str(out),
        "--measure",
        "--head",
        "--pixel-size-csv",
        str(table),
    )
    assert proc.returncode == 0, proc.stderr
    with open(out / "measurements" / "measurements.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert len(rows) == 10
    for name, size in sizes.items():
        case = name.removesuffix(".png")
        # the same mask measured directly with its pixel size: the command used the CSV's
        mask = with_pixel_size(read_image(out / name), size)
        direct = measure_head(mask)
        if direct is None:  # an under-trained net may miss a head; then no HC is given
            assert rows[case].get("hc_mm") in (None, "", "nan")
            continue
        assert float(rows[case]["hc_mm"]) == pytest.approx(
            direct.hc_mm, abs=1e-3
        )  # CSV: 3 decimals
        assert rows[case]["spacing_source"] == str(table)
        assert [float(v) for v in rows[case]["spacing_mm"].split("x")] == pytest.approx(
            [size, size]
        )
    assert (out / "measurements" / "report.html").exists()
