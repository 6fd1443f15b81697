"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against any PACS by URL and token, via dicomweb-client."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pydicom

from medseg.dicom.deid import deidentify_datasets
from medseg.dicom.seg import save_dataset_atomic
from medseg.dicom.series import NON_IMAGE_MODALITIES
from medseg.errors import MedsegError
from medseg.pacs.segment import segment_dicom
from medseg.serialization import write_json_atomic

_UID = "0020000D", "0020000E"  # StudyInstanceUID, SeriesInstanceUID
_MODALITY, _MODALITIES_IN_STUDY = "00080060", "00080061"


class PacsError(MedsegError):
    """The PACS could not be reached, or refused a request."""


def connect(url: str, *, token: str | None = None, timeout: float = 60.0):
    """A DICOMweb client for ``url`` (e.g. ``http://host:8042/dicom-web``), bearer ``token``."""
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise PacsError(f"{url}: a DICOMweb URL starts with http:// or https://")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = DICOMwebClient(url.rstrip("/"), headers=headers, timeout=timeout)
    # A few quick retries on 429/408/503/504: a busy PACS, not a long stall on a dead one.
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return client


@contextmanager
def _errors(client, what: str) -> Iterator[None]:
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise PacsError(f"{client.base_url}: {what} failed (HTTP {status})") from None
    except requests.RequestException as exc:
        raise PacsError(f"{client.base_url}: {what} failed ({type(exc).__name__})") from None


def _value(attrs: dict, tag: str) -> list:
    return attrs.get(tag, {}).get("Value", [])


def find_studies(client, *, modality: str | None = None, limit: int | None = None) -> list[str]:
    """StudyInstanceUIDs on the PACS (QIDO-RS), optionally those holding ``modality``."""
    filters = {"ModalitiesInStudy": modality} if modality else None
    with _errors(client, "study search"):
        found = client.search_for_studies(
            search_filters=filters, limit=limit, get_remaining=limit is None
        )
    return [str(_value(s, _UID[0])[0]) for s in found if _value(s, _UID[0])]


def find_series(client, study_uid: str) -> list[tuple[str, str]]:
    """``(SeriesInstanceUID, Modality)`` of a study's series (QIDO-RS)."""
    with _errors(client, f"series search of study {study_uid}"):
        found = client.search_for_series(study_instance_uid=study_uid)
    return [
        (str(_value(s, _UID[1])[0]), str((_value(s, _MODALITY) or [""])[0]))
        for s in found
        if _value(s, _UID[1])
    ]


def pull_study(
    client,
    study_uid: str,
    output_dir: str | os.PathLike,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    deidentify: bool = False,
    seed: str | None = None,
) -> list[Path]:
    """Retrieve a study's image series (WADO-RS) into ``output_dir/<series>/<instance>.dcm``.

    Non-image series (SEG, RTSTRUCT, SR...) are skipped unless ``modality`` names them.
    With ``deidentify`` the PS3.15 basic profile is applied on arrival, with one UID mapping
    for the whole study.
    """
    wanted = [
        (uid, mod)
        for uid, mod in find_series(client, study_uid)
        if (series_uid is None or uid == series_uid)
        and (
            mod.upper() == modality.upper() if modality else mod.upper() not in NON_IMAGE_MODALITIES
        )
    ]
    if not wanted:
        raise PacsError(f"{client.base_url}: study {study_uid} has no matching series")
    datasets: list[pydicom.Dataset] = []
    for uid, _ in wanted:
        with _errors(client, f"retrieval of series {uid}"):
            # "*": the stored transfer syntax, so a PACS need not transcode (Orthanc cannot
            # always decode JPEG 2000); GDCM decodes it here.
            datasets.extend(
                client.retrieve_series(study_uid, uid, media_types=(("application/dicom", "*"),))
            )
    if deidentify:
        deidentify_datasets(datasets, seed=seed)
    output_dir = Path(output_dir)
    return [
        save_dataset_atomic(
            ds, output_dir / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm", overwrite=True
        )
        for ds in datasets
    ]


def push(client, files: list[str | os.PathLike]) -> int:
    """Store DICOM files on the PACS (STOW-RS); the number of instances stored."""
    datasets = [pydicom.dcmread(f) for f in files]
    with _errors(client, "store (STOW-RS)"):
        response = client.store_instances(datasets)
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        raise PacsError(f"{client.base_url}: the PACS refused {len(failed)} instance(s)")
    return len(datasets)


def process_study(
    client,
    predictor,
    study_uid: str,
    work_dir: str | os.PathLike,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    deidentify: bool = False,
    model_name: str | None = None,
    code_table: str | os.PathLike | None = None,
    rtstruct: bool = False,
    push_result: bool = True,
) -> dict:
    """Pull a study, segment its image series and push the DICOM SEG back.

    Returns a JSON-able summary (series, SEG path, volumes in ml, whether it was pushed).
    """
    work = Path(work_dir) / study_uid
    pull_study(
        client,
        study_uid,
        work / "dicom",
        series_uid=series_uid,
        modality=modality,
        deidentify=deidentify,
    )
    result = segment_dicom(
        predictor,
        work / "dicom",
        work / "result",
        series_uid=None,
        modality=modality,
        model_name=model_name,
        code_table=code_table,
        rtstruct=rtstruct,
        overwrite=True,
    )
    outputs = [f for f in (result.seg, result.rtstruct) if f]
    pushed = push(client, outputs) if (push_result and outputs) else 0
    summary = {"study_uid": study_uid, **asdict(result), "pushed": pushed}
    write_json_atomic(summary, work / "result" / "summary.json")
    return summary


def watch(
    client,
    predictor,
    work_dir: str | os.PathLike,
    *,
    interval_s: float = 30.0,
    modality: str | None = None,
    deidentify: bool = False,
    max_cycles: int | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> dict[str, str]:
    """Poll the PACS and process each new study once (state in ``work_dir/watch_state.json``).

    Studies that already hold a SEG, or no image series, are skipped. Failures are recorded
    with their message and not retried. Stops after ``max_cycles`` polls (None: forever).
    """
    work = Path(work_dir)
    state_path = work / "watch_state.json"
    state: dict[str, str] = json.loads(state_path.read_text()) if state_path.exists() else {}
    cycle = 0
    while max_cycles is None or cycle < max_cycles:
        cycle += 1
        for study in find_studies(client):
            if study in state:
                continue
            modalities = {m.upper() for _, m in find_series(client, study)}
            if "SEG" in modalities or not modalities - NON_IMAGE_MODALITIES:
                continue  # segmented already (by us or another tool), or nothing to segment
            try:
                summary = process_study(
                    client, predictor, study, work, modality=modality, deidentify=deidentify
                )
                state[study] = "done"
                if on_result:
                    on_result(summary)
            except MedsegError as exc:
                state[study] = f"failed: {exc}"
            write_json_atomic(state, state_path)
        if max_cycles is None or cycle < max_cycles:
            time.sleep(interval_s)
    return state
