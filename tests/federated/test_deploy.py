"""A real Flower deployment on loopback: SuperLink and SuperNodes as processes, TLS, node keys.

One deployment (module fixture) runs 2 rounds with four sites and two impostors:
- ``a`` (3 cases) and ``b`` (5 cases) train normally;
- ``c`` returns NaN weights (a drill): rejected every round;
- ``d`` is killed (SIGKILL of its SuperNode's process group) once its first train message
  arrives: the round goes on with the others;
- a SuperNode whose CA is not the federation's, and one whose key is not registered, try to
  join: both are refused.
The global model of round 2 must be the case-weighted mean of a's and b's round-2 weights.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from medseg.federated.certs import make_certificates, node_key_pair
from medseg.federated.coordinator import FederationConfig, round_folder
from medseg.federated.deploy import run_local_deployment, start_supernode
from medseg.io.dataset import load_dataset
from medseg.io.phantoms import write_phantom_dataset
from medseg.model_folder import ModelFolder, read_weights

pytest.importorskip("flwr")
# ~60 s of CPU (four SuperNodes, a Python process per message); minutes when the cores are busy
pytestmark = pytest.mark.slow


def _wait_for_text(path: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("federation")
    root = write_phantom_dataset(tmp / "data", num_train=10, num_test=0, shape=(24, 24, 16))
    spec = load_dataset(root)
    ids = sorted(c.case_id for c in spec.cases)
    groups = {"a": ids[:3], "b": ids[3:8], "c": ids[8:10], "d": ids[:2]}
    config = FederationConfig(
        rounds=2,
        local_steps=2,
        min_clients=2,
        straggler_seconds=3,
        wait_for_clients_seconds=120,
        round_timeout_seconds=240,
    )
    impostors: dict[str, object] = {}
    killed: dict[str, bool] = {}

    def on_started(nodes, port, certs):
        other = make_certificates(tmp / "other_ca", sites=["x"])
        unregistered, _ = node_key_pair(tmp / "unregistered", "y")
        server = f"127.0.0.1:{port}"
        impostors["wrong_ca"] = start_supernode(
            server=server,
            ca_certificate=other.ca_certificate,
            private_key=certs.node_keys["a"],  # a registered key, but the wrong CA
            node_config={"dataset": str(root), "work-dir": str(tmp / "x")},
            home=tmp / "x",
            max_wait_seconds=20,
        )
        impostors["unregistered_key"] = start_supernode(
            server=server,
            ca_certificate=certs.ca_certificate,
            private_key=unregistered,
            node_config={"dataset": str(root), "work-dir": str(tmp / "y")},
            home=tmp / "y",
            max_wait_seconds=20,
        )

        def kill_d():
            if _wait_for_text(nodes["d"].log, "Receiving: train message", 180):
                nodes["d"].stop(kill=True)
                killed["d"] = True

        threading.Thread(target=kill_d, daemon=True).start()

    start = time.monotonic()
    history = run_local_deployment(
        spec,
        groups,
        tmp / "run",
        config,
        faults={"c": "nan", "d": "slow"},
        timeout=400,
        on_started=on_started,
        log=lambda s: None,
    )
    seconds = time.monotonic() - start
    for proc in impostors.values():
        proc.stop()
    return {
        "history": history,
        "out": tmp / "run",
        "impostors": impostors,
        "killed": killed,
        "seconds": seconds,
    }


def test_two_sites_two_rounds_over_tls_give_the_weighted_mean(deployment):
    history, out = deployment["history"], deployment["out"]
    assert history["completed"] and [r["round"] for r in history["rounds"]] == [1, 2]
    assert "https://" in (out / "server" / "flower" / "superlink.log").read_text()
    last = round_folder(out / "server", 2)
    accepted = {
        u["site"].split(" ")[0]: u["num_examples"] for u in history["rounds"][1]["accepted"]
    }
    assert accepted == {"a": 3, "b": 5}
    wa, _ = read_weights(out / "sites" / "a" / "round", "last")
    wb, _ = read_weights(out / "sites" / "b" / "round", "last")
    glob, _ = read_weights(last / "fold_0", "last")
    for name, value in glob.items():
        expected = (3 * wa[name].double() + 5 * wb[name].double()) / 8
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    # every round's global model is an ordinary model folder
    assert ModelFolder.open(last).load_networks()


def test_a_nan_update_is_rejected_and_logged(deployment):
    for record in deployment["history"]["rounds"]:
        reasons = [r["reason"] for r in record["rejected"] if r["site"].startswith("c ")]
        assert reasons and "not finite" in reasons[0]


def test_a_site_killed_mid_round_does_not_stop_the_round(deployment):
    assert deployment["killed"].get("d")
    first = deployment["history"]["rounds"][0]
    assert first["sites_asked"] == 4
    assert any("no reply" in r["reason"] for r in first["rejected"])
    assert len(first["accepted"]) == 2


def test_a_wrong_certificate_or_an_unknown_key_is_refused(deployment):
    for record in deployment["history"]["rounds"]:
        assert record["sites_asked"] <= 4  # a, b, c, d: no impostor ever joined
    wrong_ca = deployment["impostors"]["wrong_ca"].log.read_text(errors="replace")
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca or "certificate verify failed" in wrong_ca
    unknown = deployment["impostors"]["unregistered_key"].log.read_text(errors="replace")
    assert "SuperNode ID" not in unknown
