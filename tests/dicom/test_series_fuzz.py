"""Property-based fuzzing of both DICOM series readers with mutated slices.

``medseg.dicom.read_series`` (pydicom headers) and ``medseg.io.read_dicom_series`` (GDCM
headers) must give a volume or a one-line MedsegError, whatever a slice holds.
"""

from __future__ import annotations

import os
import shutil

import pytest
from dicom_factory import phantom_volume, write_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.dicom import read_series
from medseg.errors import MedsegError
from medseg.io.files import read_dicom_series

EXAMPLES = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed")
    volume, _ = phantom_volume(shape=(8, 8, 4))
    write_series(folder, volume)
    return folder


def only_medseg_errors(reader, folder) -> None:
    try:
        reader(folder)
    except MedsegError as exc:
        assert "\n" not in str(exc).strip()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    victim=st.integers(0, 3),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.integers(0, 1500),
)
def test_mutated_slice_gives_a_volume_or_a_medseg_error(seed, tmp_path_factory, victim, edits, cut):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(seed, folder, dirs_exist_ok=True)
    path = sorted(folder.iterdir())[victim]
    raw = bytearray(path.read_bytes())
    for at, value in edits:
        raw[at % len(raw)] = value
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    only_medseg_errors(read_series, folder)
    only_medseg_errors(read_dicom_series, folder)


# A slice that atheris mutated (scripts/fuzz_long.py): a damaged length field made pydicom
# try to allocate gigabytes while reading the header (libFuzzer: out-of-memory).
OOM_SLICE = (
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABESUNNAgAAAFVMBADOAAAAAgABAE9C"
    "AAACAAAAAAECAAIAVUkaADEuMi44NDAuMTAwMDguNS4xLjQuMS4xLjIAAgADAFVJQAAxLjIuODI2LjAuMS4zNjgwMDQzLjguNDk4"
    "LjIxMTM2NTY3NTQ3NDQxODM5MzA4MTU2MTYwNzMyNjEwMDI5NDU3AgAQAFVJFAAxLjIuODQwLjEwMDA4LjEuMi4xAAIAEgBVSRwA"
    "MS4yLjgyNi4wLjEuMzY4MDA0My44LjQ5OC4xAAIAEwBTSA4AUFlESUNPTSAzLjAuMiAIAAgAQ1MWAE9SSUdJTkFMXFBSSU1BUllc"
    "QVhJQUwIABYAVUkaADEuMi44NDAuMTAwMDguNS4xLjQuMS4xLjIACAAYAFVJQAAxLjIuODI2LjAuMS4zNjgwMDQzLjguNDk4LjIx"
    "MTM2NTY3NTQ3NDQxODM5MzA4MTU2MTYwNzMyNjEwMDI5NDU3CAAgAERBCAAyMDI0MDEwMggAMABUTQYAMTAxMDEwCABQAFNIBgBB"
    "Q0MxMjMIAGAAQ1MCAENUCABwAExPCgBzeW50aGV0aWMgCACAAExPFABTdCBFeGFtcGxlIEhvc3BpdGFsIAgAkABQTgoAV2hvXkRv"
    "Y3RvchAAEABQTggARG9lXkphbmUQACAATE8IAE1STi0wMDQyEAAwAERBCAAxOTcwMDEwMRAAQABDUwIARiAYAFAARFMEADIuNSAY"
    "AGAARFMGADEyMC4wICAADQBVSUAAMS4yLjgyNi4wLjEuMzY4MDA0My44LjQ5OC4zMyAwMDcyNjY4NDIzOTg2NTY5NTA2NTYyNTM4"
    "NjU3NTY4NTE4NyAADgBVSUAAMS4yLjgyNi4wLjEuMzY4MDA0My44LjQ5OC42MDMyMDc4MTcwMjkyNTc5MTQ2MTkxNzA2Mzc4MDQ3"
    "Mjc5MzQxOSAAEABTSAIAMSAgABEASVMCADMgIAASAElTAgAxICAAEwBJUwIAMSAgADIARFMQAC0xMC4wXC0yMC4wXDMwLjAgADcA"
    "RFMYADEuMFwwLjBcMC4wXDAuMFwxLjBcMC4wICAAUklAAK3/ztHN0cfNNi4wLjEuMzY4MDA0My44LjQ5OC4zNTYxMzIwMjE1MDk4"
    "MTcyMzYyOTkzNTI5MTU0MzQ2ODEyODgyOCAAQBBMTwAAKAACAFVTAgABACgABABDUwwATU9OT0NIUk9NRTIgKAAQAFVTAgAIACgA"
    "EQBVUwIACAAoADAARFMIADAuOFwwLjggKAAAAVVTAgAQACgAAQFVUwIAEAAoAAIBVVMCAA8AKAADAVVTAgABACgAUhBEUwQAMC4w"
    "ICgAUxBEUwQAMS4wICgAVBBMTwIASFXgfxAAT1cAAIAAAAABAAkAEgAKAAEABwADABAAAQD3//T/8//y//L///8AAA0A9v/0/wAA"
    "///y//7/BgD0/wUAaQD6//T/9v/7/woA6f/6//z/9P/q/wMAAwD+//n/DgD8/wwAAQAKAOn//v8EAA0ADwD+/wYA6f/7//z/DQD9"
    "/+r/+f8HAAQAAAD8/w=="
)


# Another: a damaged file meta length that pydicom (and GDCM) allocated before reading.
OOM_META = (
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABESUNNAgAAAFVMBADOAAAAAgABAE9C"
    "AAACAAAAAAECAAIAVUkaADEuMi44NDAuMTAwMDguNS4xLjQuMS4xLjIAAgADAFVJQAAxLjIuODI2LjAuMS4zNjgwMDQzLjguNDk4"
    "LjQyMjY2MDU3NDE2NDIxODg5NDQ2MzI1MDc1MDg0OTg1OTI4Njk4AgAyLjgyNi4wLjEuMzY4MDA0My44LjQ5OC4xAAIAEwBTSA4A"
    "UFlESUNPTSAzLjAuMiAIAAgAQ1MWAE9SSUdJTkFMXFBSSU1BUllcQVhJQUwIABYAVUkaADEuMi44NDAuMTAwMDguNS4xLjQuMS4x"
    "LjIACAAYAFVJQAAxLjIuODI2LjAuMS4zNjgwMDQzLjguNDk4LjQyMjY2MDU3NDE2NDIxODg5NDQ2MzI1MDc1MDg0OTg1OTI4Njk4"
    "CAAgAERBCAAyMDI0MDEwMggAMABUTQYAMTAxMDEwCABQAFNIBgBBQ0MxMjMIAGAAQ1MCAENUCABwAExPCgBzeW50aGV0aWMgCACA"
    "AExPFABTdCBFeGFtcGxlIEhvc3BpdGFsIAgAkABQTgoAV2hvXkRvY3RvchAAEABQTggARG9lXkphbmUQACAATE8IAE1STi0wMDQy"
    "EAAwAERBCAAxOTcwMDEwMRAAQABDUwIARiAYAFAARFMEADIuNSAYAGAARFMGADEyMC4wICAADQBVSUAyMTYuOAAyLi4wLjEuMzY4"
    "MDA0My44LjQ5OC40MzYwMjA5NDIyNjAzOTEzODUwNDIwNTcyNDMxMDIwNjMwODkyOSAADgBVSUAAMS4yLjgyNi4wLjEuMzY4MDA0"
    "My44LjQ5OC40MzY2NTQ0NDI5MDcwNTEzNzQ0MDAxNzE4NTUxMjk4NzkxMjI4NyAAEABTSAIAMSAgABEASVMCADMgIAASAElTAgAx"
    "ICAAEwBJUwIAMSAgADIARFMQAC0xMC4wXC0yMC4wXDMwLjAgADcARFMYADEuMFwwLjBcMC4wXDAuMFwxLjBcMC4wICAAUgBVSUAA"
    "MS4yLjgyNi4wLjEuMzY4MDA0My44LjQ5OC4zNzY3MDg3MDIyMzQzODI4NDkyNjgyMzYxODc3NDUwNTE1NDE0MyAAQBBMTwAAKAAC"
    "AFVTAgABACgABABDUwwATU9OT0NIUk9NRTIgKAAQAFVTAgAIACgAEQBVUwIACAAoADAARFMIADAuOFwwLjggKAAAAVVTAgAQACgA"
    "AQFVEwBTSA4AUFlESUNPTSAzLjAuMiAIAAgAQ1MWAE9SSUdJTkFMICgAUxBEUwQAMS4wICgAVBBMTwIASFXgfxAAT1cAAIAAAAAB"
    "AAkAEgAKAAEABwADABAAAQD3//T/8//y//L///8AAA0A9v/0/wAA///y//7/BgD0/wUABgD6//T/9v/7/woA6f/6//z/9P/q/wMA"
    "AwD+//n/DgD8/wwAAQAKAOn//tvb29vb29vb29vb29vb29v/BAANAA8A/v8GAOn/+//8/w0A/f/q//n/BwAEAAAA/P8="
)


@pytest.mark.parametrize("slice_b64", [OOM_SLICE, OOM_META], ids=["element", "meta"])
def test_regression_damaged_length_does_not_allocate_gigabytes(tmp_path, slice_b64):
    import base64
    import resource
    import tracemalloc

    (tmp_path / "slice.dcm").write_bytes(base64.b64decode(slice_b64))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        only_medseg_errors(read_series, tmp_path)
        only_medseg_errors(read_dicom_series, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 1e6:.0f} MB"  # pydicom's allocations
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss  # GDCM's, in kB
    assert grown < 512 << 10, f"peak RSS grew by {grown / 1e3:.0f} MB"
