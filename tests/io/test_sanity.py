"""The checked readers: a corpus of hostile headers, PNG encodings, DICOM slice geometry, NaN.

Each bad input must give one :class:`~medseg.errors.MedsegError` line that names the file,
before any voxel array is allocated.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import phantom_volume, write_series

from medseg.errors import MedsegError
from medseg.io import Image, read_image, read_image_channels, write_image
from medseg.io.files import read_dicom_series
from medseg.io.sanity import (
    DicomSeriesError,
    InputError,
    SliceHeader,
    check_finite,
    check_slice_geometry,
)


def nifti(path: Path, *, edit=None, shape=(4, 4, 4)) -> Path:
    """A small valid NIfTI-1 (qform), then raw header bytes changed by ``edit(bytearray)``."""
    img = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
    img.header.set_qform(np.eye(4), 1)
    img.header.set_sform(None, 0)
    nib.save(img, path)
    if edit is not None:
        raw = bytearray(path.read_bytes())
        edit(raw)
        path.write_bytes(bytes(raw))
    return path


def png(path: Path, width, height, depth, colour, rows, palette=None) -> Path:
    """A PNG written byte by byte (IHDR, optional PLTE, IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    raw = b"".join(b"\0" + row for row in rows)
    data = b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    )
    if palette:
        data += chunk(b"PLTE", palette)
    path.write_bytes(data + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def set_f32(offset, value):
    return lambda raw: raw.__setitem__(slice(offset, offset + 4), struct.pack("<f", value))


def set_dims(*dims):
    def edit(raw):
        raw[40:56] = struct.pack("<8h", len(dims), *dims, *([1] * (7 - len(dims))))

    return edit


def sform_singular(raw):
    raw[254:256] = struct.pack("<h", 1)  # sform_code 1 with two equal rows
    raw[280:328] = struct.pack("<12f", 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0)


def mha(path: Path, header: str, data: bytes = b"\0" * 64) -> Path:
    path.write_bytes(header.encode() + b"ElementDataFile = LOCAL\n" + data)
    return path


MHA = "ObjectType = Image\nNDims = 3\nElementType = MET_UCHAR\n"

BAD_NIFTI = {
    "nan_spacing": (set_f32(80, float("nan")), "spacing"),
    "zero_spacing": (set_f32(80, 0.0), "spacing"),
    "inf_spacing": (set_f32(84, float("inf")), "spacing"),
    "singular_sform": (sform_singular, "singular"),
    "absurd_size": (set_dims(30000, 30000, 30000), "limit"),
    "empty_axis": (set_dims(4, 0, 4), "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_NIFTI))
def test_hostile_nifti_headers_are_refused_before_allocation(tmp_path, case):
    edit, needle = BAD_NIFTI[case]
    path = nifti(tmp_path / f"{case}.nii", edit=edit)
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message


def test_compressed_nifti_with_absurd_size_is_refused(tmp_path):
    path = nifti(tmp_path / "huge.nii", edit=set_dims(30000, 30000, 30000))
    gz = tmp_path / "huge.nii.gz"
    gz.write_bytes(zlib.compress(path.read_bytes(), wbits=31))  # gzip stream, 64 voxels
    with pytest.raises(InputError, match="limit"):
        read_image(gz)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (MHA + "DimSize = 4 4 4\nElementSpacing = 0 1 1\n", "spacing"),
        (MHA + "DimSize = 4 4 4\nElementSpacing = nan 1 1\n", "spacing"),
        (MHA + "DimSize = 4 4 4\nTransformMatrix = 1 0 0 1 0 0 0 0 1\n", "direction"),
        (MHA + "DimSize = 50000 50000 50000\n", "limit"),
    ],
)
def test_hostile_mha_headers_are_refused(tmp_path, header, needle):
    path = mha(tmp_path / "bad.mha", header)
    with pytest.raises(MedsegError) as info:
        read_image(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_nrrd_with_zero_spacing_is_refused(tmp_path):
    path = tmp_path / "bad.nrrd"
    path.write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
        b"space: left-posterior-superior\n"
        b"space directions: (0,0,0) (0,1,0) (0,0,1)\n\n" + b"\0" * 64
    )
    with pytest.raises(MedsegError) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_valid_files_still_read(tmp_path):
    image = Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), (0.5, 1.0, 2.0))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        back = read_image(write_image(image, tmp_path / f"ok{suffix}"))
        assert np.array_equal(back.array, image.array) and back.spacing == image.spacing


def test_png_palette_and_grey_alpha_are_refused(tmp_path):
    pal = png(tmp_path / "pal.png", 4, 2, 8, 3, [bytes([0, 1, 2, 1])] * 2, bytes(range(9)))
    with pytest.raises(InputError, match="palette"):
        read_image(pal)
    la = png(tmp_path / "la.png", 2, 2, 8, 4, [b"\x10\xff\x20\x00"] * 2)
    with pytest.raises(InputError, match="grey\\+alpha"):
        read_image(la)
    huge = png(tmp_path / "huge.png", 100000, 100000, 8, 0, [b"\0"])
    with pytest.raises(InputError, match="limit"):
        read_image(huge)


def test_png_bit_depths_keep_their_stored_values(tmp_path):
    one_bit = png(tmp_path / "b1.png", 8, 1, 1, 0, [bytes([0b10100000])])
    assert read_image(one_bit).array[:, 0].tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
    two_bit = png(tmp_path / "b2.png", 4, 1, 2, 0, [bytes([0b00011011])])
    assert read_image(two_bit).array[:, 0].tolist() == [0, 1, 2, 3]
    sixteen = png(tmp_path / "g16.png", 2, 1, 16, 0, [b"\x01\x00\xff\xff"])
    assert read_image(sixteen).array[:, 0].tolist() == [256, 65535]
    rgb = png(tmp_path / "rgb.png", 1, 1, 8, 2, [b"\x0a\x14\x1e"])
    assert [c.array.item() for c in read_image_channels(rgb)] == [10, 20, 30]


def test_check_finite_refuses_or_zeroes_with_the_file_named(capsys):
    array = np.ones((4, 4, 4), np.float32)
    array[0, 0, :2] = np.nan
    array[1, 1, 1] = -np.inf
    image = Image(array, (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match=r"case\.nii\.gz: 3 voxel\(s\) are NaN or infinite"):
        check_finite([image], source="case.nii.gz")
    (fixed,) = check_finite([image], source="case.nii.gz", policy="zero")
    assert np.isfinite(fixed.array).all() and fixed.array.sum() == 64 - 3
    assert "case.nii.gz: 3 NaN or infinite voxel(s) set to 0" in capsys.readouterr().err
    ints = Image(np.ones((2, 2), np.int16), (1.0, 1.0))
    assert check_finite([ints], source="x")[0] is ints


def slices(zs, *, orientation=(1, 0, 0, 0, 1, 0), rows=4, shear=0.0):
    return [
        SliceHeader(Path(f"s{i}.dcm"), (shear * i, 0.0, z), orientation, rows, 4)
        for i, z in enumerate(zs)
    ]


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (slices([0, 2, 4, 8, 10]), "missing slice(s) (1 missing)"),
        (slices([0, 2, 2, 4]), "same position"),
        (slices([0, 2, 4, 6], shear=0.5), "gantry tilt"),
        (slices([0, 2]) + slices([4], orientation=(0, 1, 0, 1, 0, 0)), "orientation differs"),
        (slices([0, 2]) + slices([4], rows=8), "size differs"),
        (slices([0, 2, 4, 5.5]), "inconsistent slice spacing"),
        ([SliceHeader(Path("x.dcm"), (0, 0, 0), (1, 0, 0, 1, 0, 0), 4, 4)], "parallel"),
    ],
)
def test_slice_geometry_checks(items, needle):
    with pytest.raises(DicomSeriesError) as info:
        check_slice_geometry("series", items)
    assert needle in str(info.value)


def test_slice_geometry_sorts_along_the_normal():
    ordered = check_slice_geometry("series", slices([4, 0, 2]))
    assert [s.position[2] for s in ordered] == [0, 2, 4]


def test_io_dicom_reader_refuses_a_gap_like_the_hospital_reader(tmp_path):
    volume, _ = phantom_volume(shape=(8, 8, 6))
    write_series(tmp_path / "gap", volume, z_positions=[0, 2.5, 5, 10, 12.5, 15])
    with pytest.raises(DicomSeriesError, match=r"missing slice\(s\) \(1 missing\)"):
        read_dicom_series(tmp_path / "gap")
    write_series(tmp_path / "ok", volume)
    assert np.array_equal(read_dicom_series(tmp_path / "ok").array, volume)


def test_io_dicom_reader_refuses_two_image_series(tmp_path):
    volume, _ = phantom_volume(shape=(8, 8, 4))
    for uid, offset in (("1.2.3.4", 0), ("1.2.3.5", 1)):
        for f in write_series(tmp_path / uid, volume + offset, series_uid=uid):
            (tmp_path / "two").mkdir(exist_ok=True)
            f.rename(tmp_path / "two" / f"{uid}_{f.name}")
    with pytest.raises(DicomSeriesError, match="2 image series found"):
        read_dicom_series(tmp_path / "two")
    assert np.array_equal(
        read_dicom_series(tmp_path / "two", series_uid="1.2.3.5").array, volume + 1
    )


def test_nifti_nan_survives_reading(tmp_path):
    # ITK's NIfTI reader returns NaN and inf as 0; the checked reader keeps them
    array = np.ones((5, 4, 3), np.float32)
    array[1, 2, 0], array[4, 0, 2] = np.nan, -np.inf
    for suffix in (".nii", ".nii.gz"):
        back = read_image(write_image(Image(array, (1.0, 1.0, 1.0)), tmp_path / f"n{suffix}"))
        assert np.isnan(back.array[1, 2, 0]) and np.isneginf(back.array[4, 0, 2])
        assert np.isfinite(back.array).sum() == array.size - 2
