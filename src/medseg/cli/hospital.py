"""Commands of the hospital group: ``medseg deidentify``, ``medseg pacs ...``, ``medseg serve``.

:mod:`medseg.pacs` and :mod:`medseg.serve` need the ``hospital`` extra (pydicom, DICOMweb,
FastAPI), so they are imported when their command runs and the other commands work
without it.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from medseg import api
from medseg.cli.common import print_json
from medseg.errors import MedsegError
from medseg.settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this group's sub-commands to the medseg parser."""
    p = sub.add_parser(
        "deidentify", help="de-identify DICOM files (PS3.15 basic profile, consistent UIDs)"
    )
    p.add_argument("source", help="folder or zip of DICOM files")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--seed", help="secret seed: the same seed maps the same UIDs the same way")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_deidentify)

    pacs = sub.add_parser("pacs", help="pull, segment and push studies over DICOMweb")
    actions = pacs.add_subparsers(dest="pacs_command", required=True)

    def server(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--url", required=True, help="DICOMweb root, e.g. http://pacs:8042/dicom-web"
        )
        q.add_argument("--token-file", help="file holding a bearer token for the PACS")

    def selection(q: argparse.ArgumentParser) -> None:
        q.add_argument("--series-uid", help="the series to use (default: the only image series)")
        q.add_argument("--modality", help="the modality of the series to use (CT, MR, ...)")

    q = actions.add_parser("studies", help="list the PACS's StudyInstanceUIDs (QIDO-RS)")
    server(q)
    q.add_argument("--modality", help="only studies holding this modality")
    q.set_defaults(handler=run_studies)

    q = actions.add_parser("pull", help="retrieve a study's image series (WADO-RS)")
    server(q)
    q.add_argument("study_uid")
    q.add_argument("-o", "--output", required=True, help="folder for <series>/<instance>.dcm")
    selection(q)
    q.add_argument("--deidentify", action="store_true", help="de-identify on arrival")
    q.set_defaults(handler=run_pull)

    q = actions.add_parser("segment", help="segment a local DICOM series into a DICOM SEG")
    q.add_argument("model", help="model folder (or a work folder holding model/)")
    q.add_argument("source", help="folder or zip holding the series")
    q.add_argument("-o", "--output", required=True, help="folder for seg.dcm and NIfTI files")
    selection(q)
    _seg_options(q)
    q.set_defaults(handler=run_segment)

    q = actions.add_parser("push", help="store DICOM files on the PACS (STOW-RS)")
    server(q)
    q.add_argument("files", nargs="+")
    q.set_defaults(handler=run_push)

    q = actions.add_parser("run", help="pull a study, segment it and push the DICOM SEG back")
    server(q)
    q.add_argument("model")
    q.add_argument("study_uid")
    q.add_argument(
        "-w", "--work-dir", required=True, help="folder for the pulled and written files"
    )
    selection(q)
    q.add_argument("--deidentify", action="store_true")
    q.add_argument("--no-push", action="store_true", help="write the SEG but do not store it")
    _seg_options(q)
    q.set_defaults(handler=run_study)

    q = actions.add_parser("watch", help="poll the PACS and process every new study once")
    server(q)
    q.add_argument("model")
    q.add_argument("-w", "--work-dir", required=True, help="folder for files and watch_state.json")
    q.add_argument("--interval", type=float, default=30.0, metavar="SECONDS")
    q.add_argument("--max-cycles", type=int, help="stop after this many polls (default: never)")
    q.add_argument("--modality")
    q.add_argument("--deidentify", action="store_true")
    q.set_defaults(handler=run_watch)

    p = sub.add_parser("serve", help="REST service with job queue and browser viewer")
    p.add_argument("--model", required=True, help="model folder (or a work folder holding model/)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="file holding the bearer token clients must send")
    p.add_argument("--data-dir", help="folder for job files (default: a temporary folder)")
    p.add_argument("--workers", type=int, default=1, help="jobs running at once")
    p.add_argument("--max-pending", type=int, default=16, help="jobs allowed to wait")
    p.add_argument("--max-upload-mb", type=float, default=512.0)
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--job-timeout", type=float, default=900.0, metavar="SECONDS")
    p.add_argument("--pacs-url", help="DICOMweb server for POST /jobs/pacs")
    p.add_argument("--pacs-token-file")
    p.add_argument("--deidentify", action="store_true", help="de-identify every DICOM upload")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--rate-limit", type=float, metavar="PER_MINUTE", help="requests per minute and client"
    )
    p.add_argument(
        "--job-rate-limit",
        type=float,
        default=60.0,
        metavar="PER_MINUTE",
        help="new jobs per minute and client (default 60; 0: no limit)",
    )
    p.add_argument("--request-log", metavar="FILE", help="one line per request (no patient data)")
    p.add_argument("--keep-jobs", type=int, default=256, help="finished jobs kept with their files")
    p.set_defaults(handler=run_serve)


def _seg_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--codes", help="JSON label-to-SNOMED-CT table (overrides the built-in one)")
    q.add_argument("--model-name", help="algorithm name recorded in the SEG (default: folder name)")
    q.add_argument("--rtstruct", action="store_true", help="also write an RTSTRUCT (rtstruct.dcm)")
    q.add_argument("--overwrite", action="store_true")


def _token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise MedsegError(f"{path}: cannot read the token file ({exc.strerror})") from None
    if not token:
        raise MedsegError(f"{path}: the token file is empty")
    return token


def _client(args: argparse.Namespace):
    from medseg.pacs import connect

    return connect(args.url, token=_token(args.token_file))


def run_deidentify(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    written = api.deidentify(args.source, args.output, seed=args.seed, overwrite=args.overwrite)
    print(f"{len(written)} file(s) de-identified into {args.output}", file=sys.stderr)
    return 0


def run_studies(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    from medseg.pacs import find_studies

    for uid in find_studies(_client(args), modality=args.modality):
        print(uid)
    return 0


def run_pull(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    from medseg.pacs import pull_study

    files = pull_study(
        _client(args),
        args.study_uid,
        args.output,
        series_uid=args.series_uid,
        modality=args.modality,
        deidentify=args.deidentify,
    )
    print(f"{len(files)} instance(s) written to {args.output}", file=sys.stderr)
    return 0


def run_segment(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    result = api.segment_dicom(
        args.model,
        args.source,
        args.output,
        series_uid=args.series_uid,
        modality=args.modality,
        code_table=args.codes,
        model_name=args.model_name,
        rtstruct=args.rtstruct,
        overwrite=args.overwrite,
        device=settings.device,
    )
    print_json(result)
    return 0


def run_push(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    from medseg.pacs import push

    for f in args.files:
        if not Path(f).is_file():
            raise MedsegError(f"{f}: file not found")
    print(f"{push(_client(args), args.files)} instance(s) stored", file=sys.stderr)
    return 0


def run_study(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    from medseg.pacs import load_predictor, process_study

    summary = process_study(
        _client(args),
        load_predictor(args.model, device=settings.device),
        args.study_uid,
        args.work_dir,
        series_uid=args.series_uid,
        modality=args.modality,
        deidentify=args.deidentify,
        model_name=args.model_name,
        code_table=args.codes,
        rtstruct=args.rtstruct,
        push_result=not args.no_push,
    )
    print_json(summary)
    return 0


def run_watch(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    from medseg.pacs import load_predictor, watch

    state = watch(
        _client(args),
        load_predictor(args.model, device=settings.device),
        args.work_dir,
        interval_s=args.interval,
        modality=args.modality,
        deidentify=args.deidentify,
        max_cycles=args.max_cycles,
        on_result=lambda s: print(f"{s['study_uid']}: SEG pushed ({s['pushed']})", file=sys.stderr),
    )
    print_json(state)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    import uvicorn

    from medseg.serve import create_app
    from medseg.serve.guard import tls_options

    token = _token(args.token_file)
    tls = tls_options(args.tls_cert, args.tls_key)
    if token is None and not _is_loopback(args.host):
        raise MedsegError(
            f"--host {args.host}: binding beyond loopback needs --token-file (clients send it as "
            "'Authorization: Bearer <token>')"
        )
    app = create_app(  # checks the model folder (medseg.model_folder.ModelFolder.open)
        args.model,
        data_dir=args.data_dir,
        token=token,
        workers=args.workers,
        max_pending=args.max_pending,
        max_upload_mb=args.max_upload_mb,
        request_timeout_s=args.request_timeout,
        job_timeout_s=args.job_timeout,
        pacs_url=args.pacs_url,
        pacs_token=_token(args.pacs_token_file),
        deidentify=args.deidentify,
        device=settings.device,
        rate_limit_per_minute=args.rate_limit,
        job_rate_limit_per_minute=args.job_rate_limit or None,
        request_log=args.request_log,
        keep_finished_jobs=args.keep_jobs,
    )
    scheme = "https" if tls else "http"
    print(
        f"medseg service: {scheme}://{args.host}:{args.port}/ (viewer), /docs (API)",
        file=sys.stderr,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_keep_alive=5,
        access_log=False,  # uvicorn's would log query strings; medseg's request log does not
        **tls,
    )
    return 0
