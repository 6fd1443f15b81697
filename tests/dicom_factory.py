"""Synthetic DICOM series for the hospital tests (known geometry, named patient)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-0042", "PatientBirthDate": "19700101"}


def phantom_volume(shape=(32, 24, 12), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An (x, y, z) int16 CT-like volume with a bright ball, and the ball's label map."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    c = np.array(shape) / 2
    ball = ((x - c[0]) / (shape[0] / 4)) ** 2 + ((y - c[1]) / (shape[1] / 4)) ** 2 + (
        (z - c[2]) / (shape[2] / 3)
    ) ** 2 <= 1
    volume = (rng.normal(0, 10, shape) + 300 * ball).astype(np.int16)
    return volume, ball.astype(np.uint8)


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    spacing=(0.8, 0.8, 2.5),
    origin=(-10.0, -20.0, 30.0),
    z_positions: list[float] | None = None,
    shear_per_slice: float = 0.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    jpeg_ls: bool = False,
) -> list[Path]:
    """Write ``volume`` (x, y, z) as one file per slice, in shuffled file-name order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    nz = volume.shape[2]
    z_positions = z_positions or [origin[2] + k * spacing[2] for k in range(nz)]
    paths = []
    order = np.random.default_rng(1).permutation(nz)
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.PatientSex = "F"
        ds.InstitutionName = "St Example Hospital"
        ds.ReferringPhysicianName = "Who^Doctor"
        ds.AccessionNumber = "ACC123"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101010", "1"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 3, k + 1
        ds.Manufacturer = "synthetic"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0] + shear_per_slice * k, origin[1], z_positions[k]]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).tobytes()
        if jpeg_ls:
            from pydicom.uid import JPEGLSLossless

            ds.compress(JPEGLSLossless, np.ascontiguousarray(volume[:, :, k].T))
        path = folder / f"img_{order[k]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
