"""Federated training across sites with Flower, with differential privacy (issue 19).

- :mod:`.certs`: the federation's CA, SuperLink certificate and site keys;
- :mod:`.summary`: the federated fingerprint (sites send statistics, never images);
- :mod:`.site`: a site's training round on the engine (FedProx term, DP-SGD hook);
- :mod:`.dp`: DP-SGD (Opacus per-sample gradients) and the privacy ledger;
- :mod:`.aggregate`: update checks, FedAvg, FedProx, FedAdam;
- :mod:`.coordinator`: the rounds, model folders per round, resume;
- :mod:`.simulate`: sites in one process; :mod:`.deploy`: SuperLink and SuperNodes as
  processes; :mod:`.app`: the Flower ServerApp and ClientApp (needs flwr).
"""

from medseg.federated.aggregate import STRATEGIES
from medseg.federated.certs import Certificates, make_certificates
from medseg.federated.coordinator import FederationConfig, run_federation
from medseg.federated.runs import join_federation, serve_federation, simulate_federation

__all__ = [
    "STRATEGIES",
    "Certificates",
    "FederationConfig",
    "join_federation",
    "make_certificates",
    "run_federation",
    "serve_federation",
    "simulate_federation",
]
