"""Shared by the crash and full-disk tests (and benchmarks/reliability.py).

- :func:`broken_outputs`: half-written outputs under their final names.
  ``python tests/helpers/reliability.py FOLDER`` prints one ``BROKEN <path>: <why>`` line per
  file that does not read back completely (and nothing when all is well).
- :class:`Zygote`: a Python process that imports medseg once and forks one child per
  command, so that a command can be killed with SIGKILL at a random moment many times
  without paying for the imports each time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from medseg.io import read_image

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")
SKIPPED = (".medseg.lock", ".filler", ".reserve")


def broken_outputs(root: str | Path) -> list[str]:
    """``"<path>: <why>"`` for every file under ``root`` that is not complete.

    Temporary ``.tmp-*`` files are fine (a later run removes them); everything else must read
    back: images, JSON, safetensors, PyTorch checkpoints (``weights_only``), CSV (non-empty
    lines), ONNX (loadable by onnx when installed).
    """
    problems = []
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file() or path.name in SKIPPED or path.name.startswith(".tmp-"):
            continue
        name = path.name.lower()
        try:
            if name.endswith(IMAGE_SUFFIXES):
                read_image(path)
            elif name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith(".npy"):
                np.load(path, allow_pickle=False)
            elif name.endswith(".safetensors"):
                load_file(path)
            elif name.endswith(".pt"):
                torch.load(path, map_location="cpu", weights_only=True)
            elif name.endswith(".onnx"):
                import onnx  # optional

                onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure means a broken file
            problems.append(f"{path}: {type(exc).__name__}: {str(exc)[:120]}")
    return problems


ZYGOTE = r"""
import json, os, sys
import medseg.cli.main as cli  # the imports are paid once, before any fork
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        _, status = os.waitpid(request["wait"], 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps(code), flush=True)
        continue
    log = request["log"]
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        argv = request["argv"]
        if argv[0] == "__serve__":  # model, data_dir, port
            import uvicorn
            from medseg.serve import create_app
            app = create_app(argv[1], data_dir=argv[2], device="cpu", job_rate_limit_per_minute=None)
            uvicorn.run(app, host="127.0.0.1", port=int(argv[3]), log_level="warning")
            os._exit(0)
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps(pid), flush=True)
"""


class Zygote:
    """Forks ``medseg`` commands from one warm Python process (see the module docstring)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, request: dict) -> int:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], log: str | Path) -> int:
        """Fork ``medseg <argv>`` (stdout and stderr to ``log``); returns its PID."""
        return self._ask({"argv": argv, "log": str(log)})

    def wait(self, pid: int) -> int:
        """The exit code of a started command (-9 when it was killed)."""
        return self._ask({"wait": pid})

    def run(self, argv: list[str], log: str | Path) -> int:
        return self.wait(self.start(argv, log))

    def kill_at(self, argv: list[str], log: str | Path, delay_s: float) -> int:
        """Start ``argv``, SIGKILL it after ``delay_s`` (if still running); its exit code."""
        pid = self.start(argv, log)
        end = time.monotonic() + delay_s
        while time.monotonic() < end:
            try:  # finished early? (a zombie until waited: check its state)
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        return self.wait(pid)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def kill_commands(
    root: Path, *, dataset: Path, model_dir: Path, inputs: Path, predictions: Path, refs: Path
) -> dict[str, tuple[list[str], Path]]:
    """The commands of the kill trials: name -> (argv, the file that marks it done).

    Every trial works in its own ``root``; export gets its own copy of the model folder.
    """
    work = root / "work"
    model_copy = root / "model"
    return {
        "preprocess": (
            ["--quiet", "preprocess", str(dataset), "-w", str(work)],
            work / "plan.json",
        ),
        "train": (
            [
                "--quiet",
                "--device",
                "cpu",
                "train",
                str(dataset),
                "-w",
                str(work),
                "--epochs",
                "1",
                "--iterations-per-epoch",
                "2",
                "--no-augmentation",
            ],
            work / "model" / "fold_0" / "weights_last.safetensors",
        ),  # fmt: skip
        "predict": (
            [
                "--quiet",
                "--device",
                "cpu",
                "predict",
                str(model_dir),
                str(inputs),
                "-o",
                str(root / "pred"),
                "--workers",
                "1",
            ],
            root / "pred" / "predictions.json",
        ),  # fmt: skip
        "evaluate": (
            [
                "--quiet",
                "evaluate",
                str(predictions),
                str(refs),
                "-o",
                str(root / "eval"),
                "--overwrite",
            ],
            root / "eval" / "summary.json",
        ),  # fmt: skip
        "export": (
            ["--quiet", "export", str(model_copy), "--overwrite"],
            model_copy / "export" / "fold_0.onnx",
        ),
    }


def kill_trial(
    zygote: Zygote, name: str, argv: list[str], done: Path, root: Path, delay_s: float
) -> dict:
    """Kill ``argv`` after ``delay_s``, look for broken outputs, rerun it, look again.

    Returns ``{"killed": bool, "broken_after_kill": [...], "rerun_code": int,
    "broken_after_rerun": [...], "done": bool}``.
    """
    code = zygote.kill_at(argv, root / f"{name}.kill.log", delay_s)
    broken = broken_outputs(root)
    rerun = zygote.run(argv, root / f"{name}.rerun.log")
    return {
        "killed": code == -9,
        "broken_after_kill": broken,
        "rerun_code": rerun,
        "broken_after_rerun": broken_outputs(root),
        "done": done.exists(),
        "log": (root / f"{name}.rerun.log").read_text()[-300:] if rerun else "",
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_trial(zygote: Zygote, model_dir: Path, upload: Path, root: Path, delay_s: float) -> dict:
    """Kill the service during a segmentation job, restart it on the same data folder and
    run the job again; broken files are looked for after the kill and after the rerun."""
    import httpx

    data = root / "serve"
    results = {}
    for attempt in ("kill", "rerun"):
        port = free_port()
        pid = zygote.start(
            ["__serve__", str(model_dir), str(data), str(port)], root / f"serve.{attempt}.log"
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        files = {"file": (upload.name, upload.read_bytes(), "application/gzip")}
        job = httpx.post(f"{base}/jobs", files=files, timeout=30).json()
        if attempt == "kill":
            time.sleep(delay_s)
            os.kill(pid, 9)
            zygote.wait(pid)
            results["broken_after_kill"] = broken_outputs(data)
            continue
        status = {}
        for _ in range(1200):
            status = httpx.get(f"{base}/jobs/{job['id']}", timeout=5).json()
            if status["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        os.kill(pid, 9)
        zygote.wait(pid)
        results.update(rerun_status=status.get("status"), broken_after_rerun=broken_outputs(data))
    return results


if __name__ == "__main__":
    for line in broken_outputs(sys.argv[1]):
        print(f"BROKEN {line}")
