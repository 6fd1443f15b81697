"""check_dataset: every problem of a broken dataset, each with its file; clean datasets pass."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.io import Image, write_image
from medseg.io.check import CheckReport, Problem, check_dataset

DATASETS = Path(__file__).parents[2] / ".." / "shared" / "datasets"
SHAPE = (6, 5, 4)


def label_map(shape: tuple[int, ...] = SHAPE, dtype: type = np.uint8) -> np.ndarray:
    array = np.zeros(shape, dtype=dtype)
    array[1:3] = 1
    array[3:5] = 2
    return array


def mri(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def put(path: Path, array: np.ndarray, spacing=None, origin=None, direction=None) -> Path:
    ndim = array.ndim
    image = Image(array, spacing or (1.0,) * ndim, origin or (), direction or ())
    return write_image(image, path)


def put_pair(root: Path, case: str, image=None, label=None, **label_geometry) -> None:
    put(root / "imagesTr" / f"{case}.nii.gz", mri() if image is None else image)
    put(
        root / "labelsTr" / f"{case}.nii.gz",
        label_map() if label is None else label,
        **label_geometry,
    )


def msd_json(root: Path, listed: list[str], modality: dict | None = None) -> None:
    meta = {
        "name": root.name,
        "tensorImageSize": "3D",
        "modality": modality or {"0": "MRI"},
        "labels": {"0": "background", "1": "anterior", "2": "posterior"},
        "numTraining": len(listed),
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in listed
        ],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def find(report: CheckReport, path: Path, *words: str, severity: str = "error") -> list[Problem]:
    return [
        p
        for p in report.problems
        if p.path == str(path)
        and p.severity == severity
        and all(w.lower() in p.message.lower() for w in words)
    ]


def assert_reported(report: CheckReport, path: Path, *words: str, severity: str = "error") -> None:
    assert find(report, path, *words, severity=severity), (
        f"expected a {severity} for {path} mentioning {words}; report:\n{report.format()}"
    )


# ----------------------------------------------------------------------------- a broken MSD dataset

LISTED = [f"case_{i:03d}" for i in range(1, 21) if i not in (3, 4)]


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CheckReport]:
    root = tmp_path_factory.mktemp("Task99_Broken")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    msd_json(root, LISTED)
    images, labels = root / "imagesTr", root / "labelsTr"

    put_pair(root, "case_001")  # clean
    put(images / "case_002.nii.gz", mri())  # listed, label file absent
    put(images / "case_003.nii.gz", mri())  # on disk, not listed, no label
    put(labels / "case_004.nii.gz", label_map())  # label without image
    put(labels / "case_005.nii.gz", label_map())  # listed, image file absent
    put_pair(root, "case_006")
    half(images / "case_006.nii.gz")  # truncated image
    put(images / "case_007.nii.gz", mri())
    (labels / "case_007.nii.gz").write_bytes(b"")  # zero-byte label
    (images / "case_008.nii.gz").write_bytes(np.random.default_rng(8).bytes(5000))  # random bytes
    put(labels / "case_008.nii.gz", label_map())
    put_pair(root, "case_009", label=label_map((6, 5, 3)))  # shape
    put_pair(root, "case_010", spacing=(1.0, 1.0, 1.5))  # spacing
    put_pair(root, "case_011", origin=(0.0, 4.0, 0.0))  # origin
    flip = tuple(np.diag([1.0, -1.0, -1.0]).ravel())
    put_pair(root, "case_012", direction=flip)  # direction
    # float32 header rounding and a float label with integer values: both fine
    rounded = tuple(float(np.float32(v)) for v in (0.7, 0.9, 3.3))
    put(images / "case_013.nii.gz", mri(), spacing=(0.7, 0.9, 3.3), origin=(-91.7, 123.4567, 55.1))
    put(
        labels / "case_013.nii.gz",
        label_map(dtype=np.float32),
        spacing=rounded,
        origin=tuple(float(np.float32(v)) for v in (-91.7, 123.4567, 55.1)),
    )
    undeclared = label_map()
    undeclared[0, 0, 0] = 5
    put_pair(root, "case_014", label=undeclared)  # value 5 not declared
    fractional = label_map(dtype=np.float32)
    fractional[0, 0, 0] = 0.5
    put_pair(root, "case_015", label=fractional)  # non-integer label
    with_nan = mri()
    with_nan[2, 2, 2] = np.nan
    with_nan[1, 1, 1] = np.inf
    put_pair(root, "case_016", image=with_nan)  # NaN/inf
    put_pair(root, "case_017", image=np.full(SHAPE, 7, dtype=np.int16))  # constant image
    put_pair(root, "case_018", image=mri((6, 5)), label=label_map((6, 5)))  # 2D in a 3D dataset
    affine = np.eye(4)
    nib.save(
        nib.Nifti1Image(np.stack([mri(), mri(seed=1)], axis=-1), affine), images / "case_019.nii.gz"
    )
    nib.save(
        nib.Nifti1Image(label_map(), affine), labels / "case_019.nii.gz"
    )  # 4D image, 1 channel
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 4), np.float32), affine), images / "case_020.nii.gz")
    put(labels / "case_020.nii.gz", label_map())  # zero-size image

    calls: list[tuple[int, int]] = []
    report = check_dataset(root, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (19, 19)  # 18 listed cases + case_003 found on disk
    assert [done for done, _ in calls] == list(range(1, 20))
    return root, report


def test_listed_label_missing(broken) -> None:
    root, report = broken
    assert_reported(
        report, root / "labelsTr" / "case_002.nii.gz", "listed in dataset.json", "missing"
    )


def test_image_without_label(broken) -> None:
    root, report = broken
    assert_reported(report, root / "imagesTr" / "case_003.nii.gz", "without label")
    assert_reported(report, root / "imagesTr" / "case_003.nii.gz", "not listed", severity="warning")


def test_label_without_image(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_004.nii.gz", "label without image")


def test_listed_image_missing(broken) -> None:
    root, report = broken
    assert_reported(
        report, root / "imagesTr" / "case_005.nii.gz", "listed in dataset.json", "missing"
    )


def test_truncated_image(broken) -> None:
    root, report = broken
    assert_reported(report, root / "imagesTr" / "case_006.nii.gz", "truncated")


def test_zero_byte_label(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_007.nii.gz", "0 bytes")


def test_random_bytes_image(broken) -> None:
    root, report = broken
    assert_reported(report, root / "imagesTr" / "case_008.nii.gz", "not a readable image")


def test_shape_mismatch(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_009.nii.gz", "shape (6, 5, 3)", "(6, 5, 4)")


def test_spacing_mismatch(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_010.nii.gz", "spacing", "1.5")


def test_origin_mismatch(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_011.nii.gz", "origin", "4")


def test_direction_mismatch(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_012.nii.gz", "direction")


def test_float32_rounding_and_float_labels_accepted(broken) -> None:
    root, report = broken
    assert not [p for p in report.problems if "case_013" in p.path], report.format()
    assert not [p for p in report.problems if "case_001" in p.path], report.format()


def test_undeclared_label_value(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_014.nii.gz", "values 5", "not declared")


def test_non_integer_label(broken) -> None:
    root, report = broken
    assert_reported(report, root / "labelsTr" / "case_015.nii.gz", "non-integer", "0.5")


def test_nan_and_inf_in_image(broken) -> None:
    root, report = broken
    assert_reported(report, root / "imagesTr" / "case_016.nii.gz", "1 NaN", "1 infinite")


def test_constant_image_is_a_warning(broken) -> None:
    root, report = broken
    path = root / "imagesTr" / "case_017.nii.gz"
    assert_reported(report, path, "constant", "7", severity="warning")
    assert not find(report, path)  # no error


def test_2d_image_in_3d_dataset(broken) -> None:
    root, report = broken
    assert_reported(report, root / "imagesTr" / "case_018.nii.gz", "2D image in a 3D dataset")


def test_4d_image_where_3d_expected(broken) -> None:
    root, report = broken
    path = root / "imagesTr" / "case_019.nii.gz"
    assert_reported(report, path, "4D image", "2 volumes")
    assert not find(report, root / "labelsTr" / "case_019.nii.gz")  # its label fits volume 0


def test_zero_size_image(broken) -> None:
    root, report = broken
    assert_reported(report, root / "imagesTr" / "case_020.nii.gz", "zero-size")


def test_every_problem_at_once(broken) -> None:
    root, report = broken
    assert not report.ok
    assert report.num_cases == 19
    bad = {Path(p.path).name for p in report.errors}
    # every broken case has an error; clean case_001 and case_013 and constant case_017 (a warning) none
    expected = {f"case_{i:03d}" for i in range(2, 21) if i not in (13, 17)}
    assert {name.removesuffix(".nii.gz") for name in bad} == expected
    assert all(p.severity in ("error", "warning") for p in report.problems)
    assert all("\n" not in str(p) for p in report.problems)


def test_problem_str() -> None:
    problem = Problem("error", "/data/labelsTr/a.nii.gz", "shape differs")
    assert str(problem) == "ERROR /data/labelsTr/a.nii.gz: shape differs"
    assert str(Problem("warning", "x.png", "constant")) == "WARNING x.png: constant"


# ----------------------------------------------------------------------------- dataset.json problems


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"name": "x", "labels": {', "invalid json"),
        ("[1, 2]", "json object"),
        ('{"modality": {"0": "CT"}}', "labels"),
        ('{"labels": {"0": "background", "1": "a"}}', "modality"),
    ],
    ids=["truncated-json", "not-an-object", "no-labels", "no-channels"],
)
def test_bad_dataset_json_is_one_error(tmp_path: Path, text: str, words: str) -> None:
    put_pair(tmp_path, "case_001")
    (tmp_path / "dataset.json").write_text(text)
    report = check_dataset(tmp_path)
    assert len(report.problems) == 1, report.format()
    assert report.errors[0].path == str(tmp_path / "dataset.json")
    assert words in report.errors[0].message.lower()


def test_dataset_json_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_bytes(b'{"labels": "\xff\xfe"}')
    report = check_dataset(tmp_path)
    assert [p.path for p in report.errors] == [str(tmp_path / "dataset.json")]


def test_not_a_dataset_folder(tmp_path: Path) -> None:
    report = check_dataset(tmp_path)
    assert len(report.errors) == 1 and "not a dataset folder" in report.errors[0].message


# ----------------------------------------------------------------------------- nnU-Net v2 channels


def nnunet_json(root: Path, num_training: int) -> None:
    meta = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))


def put_nnunet_case(
    root: Path, case: str, *, second=None, second_spacing=None, skip_second=False
) -> None:
    put(root / "imagesTr" / f"{case}_0000.nii.gz", mri(seed=1))
    if not skip_second:
        put(
            root / "imagesTr" / f"{case}_0001.nii.gz",
            mri(seed=2) if second is None else second,
            spacing=second_spacing,
        )
    put(root / "labelsTr" / f"{case}.nii.gz", label_map())


def test_nnunet_channel_problems(tmp_path: Path) -> None:
    nnunet_json(tmp_path, 4)
    put_nnunet_case(tmp_path, "case_0000")
    put_nnunet_case(tmp_path, "case_0001", skip_second=True)
    put_nnunet_case(tmp_path, "case_0002", second=mri((6, 5, 5)))
    put_nnunet_case(tmp_path, "case_0003", second_spacing=(1.0, 2.0, 1.0))
    report = check_dataset(tmp_path)
    images = tmp_path / "imagesTr"
    assert_reported(report, images / "case_0001_0001.nii.gz", "missing channel 1")
    assert_reported(report, images / "case_0002_0001.nii.gz", "channel 1 shape (6, 5, 5)")
    assert_reported(report, images / "case_0003_0001.nii.gz", "channel 1 spacing")
    assert not [p for p in report.problems if "case_0000" in p.path], report.format()
    assert len(report.errors) == 3, report.format()


# ----------------------------------------------------------------------------- clean datasets


def test_clean_msd(tmp_path: Path) -> None:
    root = tmp_path / "Task98_Clean"
    cases = ["case_001", "case_002", "case_003"]
    put_pair(root, "case_001")
    put_pair(
        root, "case_002", image=np.random.default_rng(2).integers(0, 255, SHAPE).astype(np.uint8)
    )
    put_pair(root, "case_003", image=mri((7, 6, 4)), label=label_map((7, 6, 4), dtype=np.float32))
    msd_json(root, cases)
    report = check_dataset(root, workers=1)
    assert report.ok and report.problems == (), report.format()
    assert report.num_cases == 3


def test_clean_nnunet_v2_two_channels(tmp_path: Path) -> None:
    nnunet_json(tmp_path, 2)
    put_nnunet_case(tmp_path, "case_0000")
    put_nnunet_case(tmp_path, "case_0001")
    put(tmp_path / "imagesTs" / "case_0100_0000.nii.gz", mri())
    put(tmp_path / "imagesTs" / "case_0100_0001.nii.gz", mri())
    report = check_dataset(tmp_path)
    assert report.problems == (), report.format()
    assert (report.num_cases, report.num_test_cases) == (2, 1)


def put_png(path: Path, array: np.ndarray) -> None:
    write_image(Image(array, (1.0, 1.0)), path, overwrite=True)


def ellipse(shape: tuple[int, int], value: int = 255) -> np.ndarray:
    x, y = np.ogrid[: shape[0], : shape[1]]
    inside = ((x - shape[0] / 2) / (shape[0] / 3)) ** 2 + (
        (y - shape[1] / 2) / (shape[1] / 3)
    ) ** 2 < 1
    return (inside * value).astype(np.uint8)


def plain_2d(root: Path, names: list[str], shapes: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(5)
    for name, shape in zip(names, shapes):
        put_png(root / "images" / f"{name}.png", rng.integers(0, 255, shape).astype(np.uint8))
        put_png(root / "masks" / f"{name}.png", ellipse(shape))


def test_clean_plain_2d(tmp_path: Path) -> None:
    # different shapes between cases are fine (HC18 has one 800x542 among 800x540)
    plain_2d(tmp_path, ["000_HC", "001_HC", "002_HC"], [(40, 27), (40, 27), (40, 28)])
    report = check_dataset(tmp_path)
    assert report.problems == (), report.format()
    assert report.num_cases == 3


def test_plain_2d_problems(tmp_path: Path) -> None:
    plain_2d(tmp_path, ["a", "b", "c", "d", "e"], [(20, 16)] * 5)
    put_png(tmp_path / "masks" / "b.png", ellipse((20, 16), value=1))  # ids among 0/255 masks
    mixed = ellipse((20, 16))
    mixed[0, 0] = 128
    put_png(tmp_path / "masks" / "c.png", mixed)  # 255 and 128 in one mask
    (tmp_path / "masks" / "d.png").unlink()  # image without mask
    put_png(tmp_path / "masks" / "z.png", ellipse((20, 16)))  # mask without image
    report = check_dataset(tmp_path)
    assert_reported(report, tmp_path / "masks" / "b.png", "label ids", "0/255")
    assert_reported(report, tmp_path / "masks" / "c.png", "mixes 255", "128")
    assert_reported(report, tmp_path / "images" / "d.png", "without label")
    assert_reported(report, tmp_path / "masks" / "z.png", "mask without image")
    assert len(report.errors) == 4, report.format()


# ----------------------------------------------------------------------------- the shared datasets


SHARED = [
    ("Task04_Hippocampus", 208),
    ("HC18_fetal_head_US", 80),
    ("TotalSegmentator_example_CT", 2),
    ("TotalSegmentator_example_MR", 1),
]


@pytest.mark.integration
@pytest.mark.parametrize(("name", "num_cases"), SHARED, ids=[name for name, _ in SHARED])
def test_shared_datasets_pass(name: str, num_cases: int) -> None:
    if not DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {DATASETS.resolve()}")
    report = check_dataset(DATASETS / name)
    assert report.errors == (), report.format()
    assert report.num_cases == num_cases
