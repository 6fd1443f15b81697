"""Images in and out: files, DICOM series and dataset folders."""

from medseg.io.files import read_dicom_series, read_image, read_image_channels, write_image
from medseg.io.image import Image

__all__ = ["Image", "read_dicom_series", "read_image", "read_image_channels", "write_image"]
