"""Property-based fuzzing of the image readers: mutated NIfTI, NRRD, MHA and PNG files.

Any bytes give an image or a one-line MedsegError naming the file: never another exception,
never a crash, never an allocation the header did not justify. Crashes found here became
fixes in medseg.io.sanity / medseg.io.files and the regression cases of tests/io/test_sanity.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.errors import MedsegError
from medseg.io import Image, read_image_channels, write_image

SEEDS = {}


def seed_bytes(tmp_path_factory, suffix: str) -> bytes:
    if suffix not in SEEDS:
        folder = tmp_path_factory.mktemp("seed")
        if suffix == ".png":
            image = Image(np.arange(48, dtype=np.uint8).reshape(8, 6), (1.0, 1.0))
        else:
            image = Image(np.arange(120, dtype=np.float32).reshape(6, 5, 4), (0.5, 1.0, 2.0))
        SEEDS[suffix] = write_image(image, folder / f"seed{suffix}").read_bytes()
    return SEEDS[suffix]


@st.composite
def mutations(draw, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert"]))
        if not raw:
            break
        # header bytes matter most: aim there half of the time
        limit = min(len(raw), 400) if draw(st.booleans()) else len(raw)
        at = draw(st.integers(0, limit - 1))
        if kind == "flip":
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            value = draw(st.binary(min_size=1, max_size=8))
            raw[at : at + len(value)] = value
        elif kind == "truncate":
            del raw[at:]
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


def read_only_medseg_errors(path) -> None:
    try:
        channels = read_image_channels(path)
    except MedsegError as exc:
        assert "\n" not in str(exc).strip() and str(path) in str(exc)
        return
    for c in channels:
        assert c.array.ndim in (2, 3) and all(s > 0 for s in c.spacing)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".png"])
def test_mutated_files_give_an_image_or_a_medseg_error(tmp_path_factory, suffix):
    seed = seed_bytes(tmp_path_factory, suffix)
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(
        max_examples=int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", "60")),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(data=mutations(seed))
    def fuzz(data):
        path = folder / f"case{suffix}"
        path.write_bytes(data)
        read_only_medseg_errors(path)

    fuzz()
