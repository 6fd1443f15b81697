"""The REST service: upload an image or name a PACS study, get a job, fetch NIfTI, DICOM SEG or JSON.

Registration jobs (``POST /jobs/register``) take a fixed and a moving volume (and optionally
the moving image's labels), run medseg's classical registration and return the warped image,
the transform file, the warped labels and quality metrics through the same result endpoint.

Security rules: clients never name server paths (uploads are stored under a job folder that
the server names; the client's file name only decides the format and is refused when it holds
a path); request bodies are bounded; every request has a time limit; a bearer token is
required when one is configured (``medseg serve`` requires it when bound beyond loopback).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from contextlib import asynccontextmanager
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from medseg import __version__
from medseg.dicom.deid import deidentify_folder
from medseg.errors import MedsegError
from medseg.inference import Predictor
from medseg.io.files import read_image, write_image
from medseg.model_folder import ModelFolder
from medseg.pacs.client import connect, process_study
from medseg.pacs.segment import (
    UNCERTAINTY_FILE,
    label_volumes_ml,
    segment_dicom,
    segment_image,
)
from medseg.registration.fields import centring_transform, warp_image
from medseg.registration.pipeline import register_files
from medseg.serve.guard import RateLimiter, RequestLog, client_key
from medseg.serve.jobs import JobPool, QueueFull

UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # registration takes no DICOM zip
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,199}$")
_JOB_ID = r"^[0-9a-f]{32}$"
_UID = r"^[0-9]+(\.[0-9]+)*$"


class ResultKind(str, Enum):
    """What ``GET /jobs/{id}/result/{kind}`` returns."""

    label = "label"  # label map, NIfTI
    image = "image"  # the input volume, NIfTI (for the viewer)
    seg = "seg"  # DICOM SEG (DICOM inputs)
    metrics = "metrics"  # JSON: labels, volumes in ml, timings (registration: quality)
    warped = "warped"  # registration: the moving image on the fixed grid, NIfTI
    warped_labels = "warped_labels"  # registration: the moving labels on the fixed grid, NIfTI
    transform = "transform"  # registration: ITK transform, fixed -> moving (.tfm or .h5)
    jacobian = "jacobian"  # registration (bspline, demons): Jacobian determinant map, NIfTI
    uncertainty = "uncertainty"  # entropy map (nats), NIfTI: the viewer's uncertainty overlay


_RESULT_FILES = {
    ResultKind.label: ("label.nii.gz", "application/gzip"),
    ResultKind.image: ("image.nii.gz", "application/gzip"),
    ResultKind.seg: ("seg.dcm", "application/dicom"),
    ResultKind.warped: ("warped.nii.gz", "application/gzip"),
    ResultKind.warped_labels: ("warped_labels.nii.gz", "application/gzip"),
    ResultKind.jacobian: ("jacobian.nii.gz", "application/gzip"),
    ResultKind.uncertainty: (UNCERTAINTY_FILE, "application/gzip"),
}
_TRANSFORM_FILES = (("transform.tfm", "text/plain"), ("transform.h5", "application/x-hdf5"))


class RegistrationMethod(str, Enum):
    """Classical registration methods a registration job can use."""

    rigid = "rigid"
    affine = "affine"
    bspline = "bspline"  # affine, then a B-spline free-form deformation
    demons = "demons"  # affine, then diffeomorphic demons (mono-modal)


class RegistrationMetric(str, Enum):
    """Similarity metric of the (linear stage of the) registration."""

    mattes = "mattes"  # Mattes mutual information (multi-modal)
    ncc = "ncc"
    mse = "mse"


class JobStatus(BaseModel):
    """A job as the API shows it."""

    id: str
    kind: str
    source: str
    status: str
    progress: float
    message: str
    created: float
    started: float | None
    finished: float | None
    seconds: float
    result: dict


class PacsJob(BaseModel):
    """A study of the configured PACS to segment."""

    study_uid: str = Field(pattern=_UID, max_length=64)
    series_uid: str | None = Field(default=None, pattern=_UID, max_length=64)


def safe_upload_name(name: str | None) -> tuple[str, str]:
    """``(name, suffix)`` of a client file name; MedsegError for paths and unknown formats."""
    if not name or "/" in name or "\\" in name or ".." in name or not _SAFE_NAME.match(name):
        raise MedsegError(f"{name!r}: refused file name (plain names only, no paths)")
    lower = name.lower()
    suffix = next((s for s in UPLOAD_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        raise MedsegError(f"{name}: unsupported upload (use {', '.join(UPLOAD_SUFFIXES)})")
    return name, suffix


def volume_header(path: Path, name: str) -> tuple[int, tuple[int, ...]]:
    """``(dimension, size)`` of an image file from its header; MedsegError when unreadable."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise MedsegError(f"{name}: cannot read image (not a valid volume file)") from None
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetNumberOfComponents() != 1:
        raise MedsegError(f"{name}: a scalar image is needed, got vector pixels")
    return len(size), size


def check_registration_pair(
    fixed: tuple[str, Path], moving: tuple[str, Path], labels: tuple[str, Path] | None
) -> None:
    """Refuse pairs that cannot be registered, from the headers (MedsegError naming the files)."""
    (f_name, f_path), (m_name, m_path) = fixed, moving
    f_dim, f_size = volume_header(f_path, f_name)
    m_dim, m_size = volume_header(m_path, m_name)
    for name, dim in ((f_name, f_dim), (m_name, m_dim)):
        if dim not in (2, 3):
            raise MedsegError(f"{name}: a 2D or 3D image is needed, got {dim}D")
    if f_dim != m_dim:
        raise MedsegError(
            f"{m_name}: a {m_dim}D moving image cannot be registered to the {f_dim}D fixed "
            f"image {f_name} (both must have the same dimension)"
        )
    for name, size in ((f_name, f_size), (m_name, m_size)):
        if min(size) < 4:
            raise MedsegError(f"{name}: image of size {size} is too small to register")
    if labels is not None:
        _, l_size = volume_header(labels[1], labels[0])
        if l_size != m_size:
            raise MedsegError(
                f"{labels[0]}: labels of size {l_size} do not match the moving image "
                f"{m_name} of size {m_size}"
            )


def _finite(value):
    """JSON-safe copy: NaN and infinities become None."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Model:
    """The predictor, loaded once on first use (startup stays fast; jobs share it)."""

    def __init__(self, model_dir: Path | None, predictor, device: str):
        self.model_dir, self._predictor, self.device = model_dir, predictor, device
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._predictor is None:
                self._predictor = Predictor(self.model_dir, device=self.device)
            return self._predictor

    @property
    def loaded(self) -> bool:
        return self._predictor is not None


def create_app(
    model_dir: str | os.PathLike | None = None,
    *,
    predictor=None,
    data_dir: str | os.PathLike | None = None,
    token: str | None = None,
    workers: int = 1,
    max_pending: int = 16,
    max_upload_mb: float = 512.0,
    request_timeout_s: float = 120.0,
    job_timeout_s: float = 900.0,
    pacs_url: str | None = None,
    pacs_token: str | None = None,
    deidentify: bool = False,
    model_name: str | None = None,
    device: str = "auto",
    rate_limit_per_minute: float | None = None,
    job_rate_limit_per_minute: float | None = 60.0,
    request_log: str | os.PathLike | None = None,
    keep_finished_jobs: int = 256,
):
    """Build the FastAPI application.

    Parameters
    ----------
    model_dir
        Trained model folder (loaded on the first job). Or pass ``predictor`` directly.
    data_dir
        Where jobs keep their files (default: a new temporary folder).
    token
        Bearer token required on every endpoint except ``/health``, ``/`` and ``/static``.
    workers, max_pending
        Jobs running at once, and jobs allowed to wait (more: HTTP 503).
    max_upload_mb, request_timeout_s, job_timeout_s
        Limits: request body size (HTTP 413), time per request (HTTP 504), time per job.
    pacs_url, pacs_token
        The DICOMweb server that ``POST /jobs/pacs`` pulls from and pushes SEGs to.
    deidentify
        Apply the PS3.15 basic profile to DICOM inputs before anything is stored.
    rate_limit_per_minute, job_rate_limit_per_minute
        Per-client limits (see :class:`medseg.serve.guard.RateLimiter`) on all requests
        (default: none) and on new jobs (``POST /jobs...``, default 60 a minute); beyond
        them, HTTP 429 with ``Retry-After``.
    request_log
        A file that receives one line per request (logger ``medseg.serve.requests``):
        client tag, method, route, status, time; never a body, file name or query.
    keep_finished_jobs
        Finished jobs kept (with their files); older ones are deleted.
    """
    if model_dir is None and predictor is None:
        raise MedsegError("the service needs a model folder")
    # A folder that is not a trained model folder fails here, not on the first job.
    folder = ModelFolder.open(model_dir).path if model_dir and predictor is None else None
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="medseg-serve-"))
    pool = JobPool(
        root / "jobs",
        workers=workers,
        max_pending=max_pending,
        timeout_s=job_timeout_s,
        keep_finished=keep_finished_jobs,
    )
    model = _Model(folder, predictor, device)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    name = model_name or (Path(model_dir).name if model_dir else "medseg")
    stats = {
        "requests": 0,
        "rejected_size": 0,
        "timeouts": 0,
        "rate_limited": 0,
        "started": time.time(),
    }
    requests_log = RequestLog(request_log)
    limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute else None
    job_limiter = RateLimiter(job_rate_limit_per_minute) if job_rate_limit_per_minute else None

    @asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown()
        requests_log.close()

    app = FastAPI(
        lifespan=lifespan,
        title="medseg service",
        version=str(__version__),
        description="Segmentation jobs from uploads (NIfTI, zip of DICOM) or PACS studies; "
        "registration jobs from two uploaded volumes.",
    )
    app.state.pool, app.state.model = pool, model

    @app.middleware("http")
    async def limits(request: Request, call_next):
        stats["requests"] += 1
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            stats["rejected_size"] += 1
            return JSONResponse(
                {"detail": f"request body larger than {max_upload_mb:g} MB"}, status_code=413
            )
        try:
            return await asyncio.wait_for(call_next(request), timeout=request_timeout_s)
        except asyncio.TimeoutError:
            stats["timeouts"] += 1
            return JSONResponse({"detail": "request timed out"}, status_code=504)

    @app.middleware("http")  # added last, so it runs first: refused requests are logged too
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        client = client_key(request.client.host if request.client else None)
        path = request.url.path
        wait = 0.0
        if path != "/health":
            if limiter is not None:
                wait = limiter.allow(client)
            if not wait and job_limiter is not None and request.method == "POST":
                wait = job_limiter.allow(client)
        if wait:
            stats["rate_limited"] += 1
            response = JSONResponse(
                {"detail": "too many requests from this client; slow down"},
                status_code=429,
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        else:
            response = await call_next(request)
        requests_log.log(
            client=client,
            method=request.method,
            path=path,
            status=response.status_code,
            seconds=time.perf_counter() - started,
        )
        return response

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    auth = [Depends(check_token)]

    def job_or_404(job_id: str):
        job = pool.get(job_id) if re.match(_JOB_ID, job_id) else None
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    def run_upload(job, upload: Path, suffix: str, deid: bool) -> dict:
        job.progress = 0.05
        predictor = model.get()
        job.progress = 0.2
        out = job.folder / "result"
        t = time.perf_counter()
        if suffix == ".zip":
            source = upload
            if deid:
                source = job.folder / "deidentified"
                deidentify_folder(upload, source)
                upload.unlink()  # only the de-identified copy is kept
            result = segment_dicom(predictor, source, out, model_name=name)
            volumes, labels, seg = result.volumes_ml, result.labels, result.seg
        else:
            image = read_image(upload)
            if image.ndim != 3:
                raise MedsegError(f"{job.source}: a 3D volume is needed, got {image.ndim}D")
            label, labels, _, _ = segment_image(predictor, image, out, uncertainty=True)
            volumes, seg = label_volumes_ml(label, labels), None
        return {
            "uncertainty": (out / UNCERTAINTY_FILE).exists(),
            "labels": {str(k): v for k, v in labels.items()},
            "volumes_ml": volumes,
            "seg": seg is not None,
            "predict_seconds": round(time.perf_counter() - t, 3),
            "model": name,
        }

    def run_pacs(job, study_uid: str, series_uid: str | None) -> dict:
        job.progress = 0.05
        client = connect(pacs_url, token=pacs_token)
        summary = process_study(
            client,
            model.get(),
            study_uid,
            job.folder / "pacs",
            series_uid=series_uid,
            deidentify=deidentify,
            model_name=name,
        )
        result = job.folder / "result"
        result.mkdir(exist_ok=True)
        for key, file in (("image", "image.nii.gz"), ("label", "label.nii.gz"), ("seg", "seg.dcm")):
            if summary.get(key):
                shutil.move(summary[key], result / file)
        return {
            "labels": {str(k): v for k, v in summary["labels"].items()},
            "volumes_ml": summary["volumes_ml"],
            "seg": bool(summary.get("seg")),
            "pushed": summary["pushed"],
            "model": name,
        }

    def run_register(job, files: dict[str, tuple[str, Path]], method: str, metric: str) -> dict:
        import numpy as np

        out = job.folder / "result"
        out.mkdir()
        fixed_nifti = out / "image.nii.gz"  # the fixed volume, as the viewer loads it
        # Errors name the client's file names, never the job folder's.
        names = {str(fixed_nifti): files["fixed"][0]}
        names.update({str(path): name for name, path in files.values()})

        def ncc(a, b) -> float:
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            a, b = a - a.mean(), b - b.mean()
            denom = np.sqrt((a * a).sum() * (b * b).sum())
            return float((a * b).sum() / denom) if denom > 0 else float("nan")

        try:
            job.progress = 0.05
            fixed = read_image(files["fixed"][1])
            write_image(fixed, fixed_nifti)
            job.progress = 0.15
            labels = files.get("moving_labels")
            summary = register_files(
                fixed_nifti,
                files["moving"][1],
                out,
                method=method,
                metric=metric,
                labels=labels[1] if labels else None,
                report=False,
            )
            job.progress = 0.85
            moving = read_image(files["moving"][1])
            warped = read_image(out / "warped.nii.gz")
            before = warp_image(moving, fixed, centring_transform(fixed, moving))
        except MedsegError as exc:
            message = str(exc)
            for path, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
                message = message.replace(path, name)
            raise MedsegError(message) from None
        linear = summary.get("linear_part", {})
        quality = summary.get("quality")
        if quality is None:  # linear: one Jacobian determinant everywhere
            ndim = fixed.ndim
            matrix = linear.get("matrix")
            det = float(np.linalg.det(np.reshape(matrix, (ndim, ndim)))) if matrix else 1.0
            quality = {
                "folding_percent": 0.0 if det > 0 else 100.0,
                "jacobian_min": det,
                "jacobian_max": det,
                "jacobian_mean": det,
            }
        transform = next(f for f, _ in _TRANSFORM_FILES if (out / f).exists())
        kinds = ["image", "warped", "transform", "metrics"]
        if labels:
            kinds.append("warped_labels")
        if (out / "jacobian.nii.gz").exists():
            kinds.append("jacobian")
        return _finite(
            {
                "registration": {"fixed": "image", "warped": "warped"},
                "method": method,
                "metric": metric,
                "metric_value": summary.get("metric_value"),
                "iterations": summary.get("iterations"),
                "stop_condition": summary.get("stop_condition"),
                "register_seconds": summary["seconds"],
                "ncc_before": ncc(fixed.array, before.array),
                "ncc_after": ncc(fixed.array, warped.array),
                "quality": quality,
                "linear_part": linear,
                "transform_file": transform,
                "results": kinds,
                "fixed": files["fixed"][0],
                "moving": files["moving"][0],
                "moving_labels": labels[0] if labels else None,
            }
        )

    def store_upload(job, file: UploadFile, dest: Path) -> None:
        """Stream an upload into the job folder; 413 (and the job dropped) past the limit."""
        size = 0
        with open(dest, "wb") as f:
            while chunk := file.file.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:  # chunked bodies carry no Content-Length
                    f.close()
                    drop(job)
                    raise HTTPException(413, f"upload larger than {max_upload_mb:g} MB")
                f.write(chunk)

    def drop(job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)
        pool.jobs.pop(job.id, None)

    @app.get("/health")
    def health() -> dict:
        """Liveness: the service answers; whether the model is loaded yet."""
        return {"status": "ok", "version": __version__, "model_loaded": model.loaded}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=auth)
    def metrics() -> str:
        """Prometheus text format: jobs by status, job durations, requests, rejections."""
        lines = ["# TYPE medseg_jobs gauge"]
        lines += [f'medseg_jobs{{status="{s}"}} {n}' for s, n in pool.counts().items()]
        lines += [
            "# TYPE medseg_job_seconds summary",
            f"medseg_job_seconds_count {pool.done_count}",
            f"medseg_job_seconds_sum {pool.done_seconds:.3f}",
            "# TYPE medseg_requests_total counter",
            f"medseg_requests_total {stats['requests']}",
            f"medseg_rejected_oversize_total {stats['rejected_size']}",
            f"medseg_request_timeouts_total {stats['timeouts']}",
            f"medseg_rate_limited_total {stats['rate_limited']}",
            f"medseg_uptime_seconds {time.time() - stats['started']:.1f}",
        ]
        return "\n".join(lines) + "\n"

    @app.post("/jobs", status_code=202, response_model=JobStatus, dependencies=auth)
    def submit_upload(
        file: Annotated[UploadFile, File(description="NIfTI/NRRD/MHA volume or a zip of DICOM")],
        deidentify_input: Annotated[bool, Form()] = False,
    ) -> dict:
        """Upload a volume and start a segmentation job."""
        try:
            filename, suffix = safe_upload_name(file.filename)
        except MedsegError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            job = pool.new_job("upload", filename)
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None
        dest = job.folder / f"input{suffix}"
        store_upload(job, file, dest)
        pool.submit(job, lambda j: run_upload(j, dest, suffix, deidentify or deidentify_input))
        return job.public()

    @app.post("/jobs/register", status_code=202, response_model=JobStatus, dependencies=auth)
    def submit_register(
        fixed: Annotated[UploadFile, File(description="fixed volume (NIfTI/NRRD/MHA)")],
        moving: Annotated[UploadFile, File(description="moving volume (NIfTI/NRRD/MHA)")],
        method: Annotated[RegistrationMethod, Form()] = RegistrationMethod.rigid,
        metric: Annotated[RegistrationMetric, Form()] = RegistrationMetric.mattes,
        moving_labels: Annotated[
            UploadFile | None, File(description="labels of the moving volume, warped too")
        ] = None,
    ) -> dict:
        """Upload a fixed and a moving volume and start a registration job (moving -> fixed)."""
        uploads = {"fixed": fixed, "moving": moving}
        if moving_labels is not None and moving_labels.filename:
            uploads["moving_labels"] = moving_labels
        checked = {}
        try:
            for role, upload in uploads.items():
                filename, suffix = safe_upload_name(upload.filename)
                if suffix not in VOLUME_SUFFIXES:
                    raise MedsegError(
                        f"{filename}: registration takes {', '.join(VOLUME_SUFFIXES)} volumes"
                    )
                checked[role] = (filename, suffix)
        except MedsegError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            job = pool.new_job("register", f"{checked['moving'][0]} -> {checked['fixed'][0]}")
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None
        files = {}
        for role, upload in uploads.items():
            filename, suffix = checked[role]
            files[role] = (filename, job.folder / f"{role}{suffix}")
            store_upload(job, upload, files[role][1])
        try:
            check_registration_pair(files["fixed"], files["moving"], files.get("moving_labels"))
        except MedsegError as exc:
            drop(job)
            raise HTTPException(400, str(exc)) from None
        pool.submit(job, lambda j: run_register(j, files, method.value, metric.value))
        return job.public()

    @app.post("/jobs/pacs", status_code=202, response_model=JobStatus, dependencies=auth)
    def submit_pacs(body: PacsJob) -> dict:
        """Segment a study of the configured PACS and push the DICOM SEG back."""
        if pacs_url is None:
            raise HTTPException(409, "this service has no PACS configured (--pacs-url)")
        try:
            job = pool.new_job("pacs", body.study_uid)
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None
        pool.submit(job, lambda j: run_pacs(j, body.study_uid, body.series_uid))
        return job.public()

    @app.get("/jobs", dependencies=auth)
    def list_jobs() -> list[dict]:
        """All jobs, newest first."""
        jobs = sorted(pool.jobs.values(), key=lambda j: -j.created)
        return [{"id": j.id, "status": j.status, "source": j.source} for j in jobs]

    @app.get("/jobs/{job_id}", response_model=JobStatus, dependencies=auth)
    def job_status(job_id: str) -> dict:
        """A job's status, progress and (when done) its labels and volumes."""
        return job_or_404(job_id).public()

    @app.get("/jobs/{job_id}/result/{kind}", dependencies=auth)
    def job_result(job_id: str, kind: ResultKind):
        """A finished job's label map or input (NIfTI), DICOM SEG, or metrics (JSON).

        Registration jobs: ``image`` (the fixed volume), ``warped``, ``warped_labels``,
        ``transform`` (ITK .tfm, or .h5 for deformable methods), ``jacobian`` and ``metrics``.
        """
        job = job_or_404(job_id)
        if job.status != "done":
            raise HTTPException(409, f"job is {job.status}")
        if kind is ResultKind.metrics:
            return job.public()["result"]
        if kind is ResultKind.transform:
            found = [(f, m) for f, m in _TRANSFORM_FILES if (job.folder / "result" / f).exists()]
            filename, media = found[0] if found else _TRANSFORM_FILES[0]
        else:
            filename, media = _RESULT_FILES[kind]
        path = job.folder / "result" / filename
        if not path.exists():
            raise HTTPException(404, f"this job has no {kind.value} result")
        return FileResponse(path, media_type=media, filename=f"{job.id}_{filename}")

    static = resources.files("medseg.serve").joinpath("static")
    if not static.joinpath("niivue.umd.js").is_file():
        warnings.warn(
            "the viewer's NiiVue bundle is missing: run scripts/build_viewer.sh (needs npm)",
            stacklevel=2,
        )
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return RedirectResponse("/static/index.html")

    return app
