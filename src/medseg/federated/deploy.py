"""A real Flower deployment: the SuperLink, the SuperNodes and the submitted run, as processes.

Coordinator (``medseg federated server``, :func:`serve`):

1. starts ``flower-superlink`` with the federation's TLS certificate (``--ssl-*``) and
   ``--enable-supernode-auth``, listening on ``host:port`` (Flower 1.42 serves the Fleet API,
   which SuperNodes use, and the Control API, which ``flwr`` uses, on this one HTTPS port);
2. registers every site's public key (``nodes/*.pub``) with ``flwr supernode register``:
   only these SuperNodes may connect;
3. writes a small Flower app (``pyproject.toml`` naming ``medseg.federated.app``) and
   submits it with ``flwr run``; the SuperLink starts the ServerApp, which runs the
   coordinator (:func:`medseg.federated.coordinator.run_federation`) and saves each
   round's model folder into ``out``;
4. stops the SuperLink when the run ends.

Site (``medseg federated client``, :func:`join`): starts ``flower-supernode`` with the
CA certificate (``--root-certificates``: it refuses a SuperLink whose certificate the
federation's CA did not sign) and its private key (``--auth-supernode-private-key``). The
SuperNode runs each message's ClientApp in a subprocess.

Every process gets its own process group and is stopped by its group id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from medseg.errors import MedsegError
from medseg.federated.certs import Certificates, make_certificates
from medseg.federated.coordinator import FederationConfig, say
from medseg.federated.simulate import write_site_files
from medseg.io.dataset import DatasetSpec
from medseg.serialization import write_json_atomic

__all__ = [
    "FlowerProcess",
    "free_port",
    "join",
    "node_config_string",
    "run_local_deployment",
    "serve",
    "start_supernode",
    "wait_for_port",
]

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "medseg-federated"
version = "1.0.0"
description = "medseg federated segmentation training (issue 19)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "medseg"

[tool.flwr.app.components]
serverapp = "medseg.federated.app:server_app"
clientapp = "medseg.federated.app:client_app"

[tool.flwr.app.config]
out-dir = ""
"""


def _bin(name: str) -> str:
    """A console script of this environment (Flower's, beside this Python)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flower_env(home: Path) -> dict[str, str]:
    """The environment of Flower processes: this venv first on PATH, its own FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


@dataclass
class FlowerProcess:
    """A started Flower process (its own process group) and its log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    handle: IO[Any]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> int | None:
        """SIGTERM (or SIGKILL) the process group; SIGKILL if it outlives ``timeout``."""
        # the whole group, even when its leader has exited (children may outlive it)
        try:
            os.killpg(self.popen.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        self.handle.close()
        return self.popen.returncode


def _start(name: str, command: list[str], *, env: dict[str, str], log: Path) -> FlowerProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "ab")  # noqa: SIM115 (closed by FlowerProcess.stop)
    popen = subprocess.Popen(
        command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    return FlowerProcess(name, popen, log, handle)


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, *, timeout: float, process: FlowerProcess | None = None
) -> None:
    """Until ``host:port`` accepts connections (a one-line error after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise MedsegError(f"{process.name} exited (see {process.log})")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise MedsegError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _flwr(args: list[str], *, env: dict[str, str], timeout: float | None = 120) -> str:
    done = subprocess.run(
        [_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise MedsegError(
            f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed: {' | '.join(tail)}"
        )
    return done.stdout


def _write_cli_config(home: Path, address: str, ca: Path | None) -> None:
    lines = [
        "[superlink]",
        'default = "medseg"',
        "",
        "[superlink.medseg]",
        f'address = "{address}"',
    ]
    lines.append(f'root-certificates = "{ca.resolve()}"' if ca else "insecure = true")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def node_config_string(values: dict[str, Any]) -> str:
    """``--node-config`` text: ``key="value"`` pairs (strings quoted, numbers bare)."""
    parts = []
    for key, value in values.items():
        if value is None:
            continue
        parts.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return " ".join(parts)


def serve(
    out_dir: str | os.PathLike,
    certs_dir: str | os.PathLike,
    config: FederationConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 9092,
    connect_host: str = "127.0.0.1",
    on_ready: Callable[[], None] | None = None,
    log: Callable[[str], None] = say,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run the coordinator as a Flower deployment until the rounds are done.

    Parameters
    ----------
    out_dir
        Round model folders, the plan, logs (``flower/superlink.log``, ``flower/run.log``).
        Started again on the same folder, the rounds resume after the last saved one.
    certs_dir
        From ``medseg federated certs``: ``ca.crt``, ``server.pem``, ``server.key`` and
        the sites' ``nodes/*.pub`` (each registered with the SuperLink).
    config
        Rounds, strategy, sites needed, local steps, privacy.
    host, port
        Where the SuperLink listens (``0.0.0.0`` to accept other machines).
    connect_host
        How this machine's ``flwr`` reaches the SuperLink (must be in the certificate).
    on_ready
        Called once the SuperLink runs and the sites' keys are registered (a local
        deployment starts its SuperNodes here).
    timeout
        Seconds to wait for the run (``None``: no limit).

    Returns
    -------
    dict
        The coordinator's ``federation.json``.
    """
    out = Path(out_dir).resolve()
    certs = Certificates.read(certs_dir)
    for path in (certs.server_certificate, certs.server_key):
        if not path.is_file():
            raise MedsegError(f"{path}: missing (the coordinator needs the server certificate)")
    keys = certs.public_keys()
    if not keys:
        raise MedsegError(f"{certs.folder}/nodes: no site public key (*.pub) to register")
    home = out / "flower"
    env = flower_env(home)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(_config_dict(config), out / "federation_config.json")
    app_dir = home / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_TOML)
    superlink = _start(
        "flower-superlink",
        [
            _bin("flower-superlink"),
            "--ssl-ca-certfile", str(certs.ca_certificate),
            "--ssl-certfile", str(certs.server_certificate),
            "--ssl-keyfile", str(certs.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", host,
            "--port", str(port),
        ],
        env=env,
        log=home / "superlink.log",
    )  # fmt: skip
    try:
        wait_for_port(connect_host, port, timeout=60, process=superlink)
        _write_cli_config(home, f"{connect_host}:{port}", certs.ca_certificate)
        for key in keys:
            _flwr(["supernode", "register", str(key), "medseg"], env=env)
        log(f"SuperLink on {host}:{port} (TLS, node authentication: {len(keys)} site key(s))")
        if on_ready is not None:
            on_ready()
        run_log = home / "run.log"
        with open(run_log, "ab") as handle:
            done = subprocess.run(
                [
                    _bin("flwr"), "run", str(app_dir), "medseg",
                    "--run-config", f"out-dir={json.dumps(str(out))}",
                    "--stream",
                ],
                env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
            )  # fmt: skip
        history_path = out / "federation.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else {}
        if done.returncode != 0 or not history.get("completed"):
            tail = run_log.read_text(errors="replace").strip().splitlines()[-5:]
            raise MedsegError(
                f"the federated run did not complete (see {run_log}): {' | '.join(tail)}"
            )
        return history
    finally:
        superlink.stop()


def _config_dict(config: FederationConfig) -> dict[str, Any]:
    return asdict(config)


def start_supernode(
    *,
    server: str,
    ca_certificate: str | os.PathLike,
    private_key: str | os.PathLike,
    node_config: dict[str, Any],
    home: str | os.PathLike,
    runtime_port: int | None = None,
    max_wait_seconds: float | None = None,
) -> FlowerProcess:
    """Start a site's ``flower-supernode`` (TLS to ``server``, authenticated by its key)."""
    home = Path(home).resolve()
    command = [
        _bin("flower-supernode"),
        "--root-certificates", str(Path(ca_certificate).resolve()),
        "--superlink", server,
        "--auth-supernode-private-key", str(Path(private_key).resolve()),
        "--node-config", node_config_string(node_config),
        "--port", str(runtime_port or free_port()),
    ]  # fmt: skip
    if max_wait_seconds is not None:
        command += ["--max-wait-time", str(max_wait_seconds)]
    return _start("flower-supernode", command, env=flower_env(home), log=home / "supernode.log")


def join(
    dataset: str | os.PathLike,
    *,
    server: str,
    ca_certificate: str | os.PathLike,
    private_key: str | os.PathLike,
    work_dir: str | os.PathLike,
    runtime_port: int | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
    name: str = "site",
    log: Callable[[str], None] = say,
) -> int:
    """Run a site's SuperNode until it is stopped (Ctrl-C) or exits; its exit status."""
    work = Path(work_dir).resolve()
    for path in (ca_certificate, private_key):
        if not Path(path).is_file():
            raise MedsegError(f"{path}: not found")
    node = start_supernode(
        server=server,
        ca_certificate=ca_certificate,
        private_key=private_key,
        node_config={
            "dataset": str(Path(dataset).resolve()),
            "work-dir": str(work),
            "name": name,
            "device": device,
            "threads": num_threads or 0,
        },
        home=work / "flower",
        runtime_port=runtime_port,
    )
    log(f"site {name}: SuperNode connecting to {server} (log: {node.log}); Ctrl-C to leave")
    try:
        return int(node.popen.wait())
    except KeyboardInterrupt:
        return int(node.stop() or 0)
    finally:
        node.stop()


def run_local_deployment(
    spec: DatasetSpec,
    groups: dict[str, list[str]],
    out_dir: str | os.PathLike,
    config: FederationConfig,
    *,
    faults: dict[str, str] | None = None,
    num_threads: int | None = 1,
    timeout: float | None = None,
    on_started: Callable[[dict[str, FlowerProcess], int, Certificates], None] | None = None,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """The whole deployment on this machine: certificates, a SuperLink, one SuperNode per
    site (each with its cases, key and work folder), all on loopback with TLS."""
    out = Path(out_dir).resolve()
    certs = make_certificates(out / "certs", sites=list(groups), overwrite=True)
    site_files = write_site_files(out / "sites", spec, groups)
    port = free_port()
    nodes: dict[str, FlowerProcess] = {}

    def start_nodes() -> None:
        for name in groups:
            work = out / "sites" / name
            nodes[name] = start_supernode(
                server=f"127.0.0.1:{port}",
                ca_certificate=certs.ca_certificate,
                private_key=certs.node_keys[name],
                node_config={
                    "dataset": str(Path(spec.root).resolve()),
                    "work-dir": str(work),
                    "cases-file": str(site_files[name]),
                    "name": name,
                    "threads": num_threads or 0,
                    "fault": (faults or {}).get(name),
                },
                home=work / "flower",
            )
        if on_started is not None:
            on_started(nodes, port, certs)

    try:
        return serve(
            out / "server", certs.folder, config, port=port, on_ready=start_nodes,
            timeout=timeout, log=log,
        )  # fmt: skip
    finally:
        for node in nodes.values():
            node.stop()
