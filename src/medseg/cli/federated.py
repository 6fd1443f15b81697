"""``medseg federated certs|server|client|simulate``: federated training with Flower (issue 19)."""

from __future__ import annotations

import argparse

from medseg import api
from medseg.cli.common import comma_list, print_json
from medseg.federated import STRATEGIES, FederationConfig
from medseg.settings import Settings


def _add_round_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fedavg")
    p.add_argument("--min-clients", type=int, default=2, help="sites needed in every round")
    p.add_argument("--local-steps", type=int, default=20, help="optimizer steps per site and round")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=3e-3,
        help="AdamW rate of round 1 (cosine over rounds)",
    )
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx term weight")
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam server step")
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=0.0,
        help="DP-SGD at every site with this total epsilon over all rounds (0: off)",
    )
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--dp-clip", type=float, default=1.0, help="per-sample gradient norm bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--straggler-seconds",
        type=float,
        default=60.0,
        help="once --min-clients sites replied, wait this long for the others",
    )
    p.add_argument("--name", default="federated", help="dataset name in the plan")


def _config(args: argparse.Namespace) -> FederationConfig:
    return FederationConfig(
        rounds=args.rounds,
        strategy=args.strategy,
        min_clients=args.min_clients,
        local_steps=args.local_steps,
        learning_rate=args.learning_rate,
        proximal_mu=args.proximal_mu,
        server_lr=args.server_lr,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        dp_clip=args.dp_clip,
        seed=args.seed,
        straggler_seconds=args.straggler_seconds,
        dataset_name=args.name,
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``medseg federated ...`` to the medseg parser."""
    group = sub.add_parser("federated", help="train one model across sites (Flower, TLS, DP)")
    fed = group.add_subparsers(dest="federated_command", metavar="COMMAND", required=True)

    p = fed.add_parser("certs", help="make the federation's CA, server certificate and site keys")
    p.add_argument("-o", "--output", required=True, help="certificate folder")
    p.add_argument("--sites", type=comma_list, required=True, help="site names, comma-separated")
    p.add_argument(
        "--hosts",
        type=comma_list,
        default=None,
        help="names/IPs sites use to reach the server (default localhost,127.0.0.1)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_certs)

    p = fed.add_parser("server", help="coordinate the rounds (Flower SuperLink with TLS)")
    p.add_argument("-o", "--output", required=True, help="folder of the round model folders")
    p.add_argument("--certs", required=True, help="folder from `medseg federated certs`")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default all)")
    p.add_argument("--port", type=int, default=9092, help="SuperLink port (default 9092)")
    p.add_argument(
        "--connect-host", default="127.0.0.1", help="how this machine reaches its own SuperLink"
    )
    _add_round_options(p)
    p.set_defaults(handler=run_server)

    p = fed.add_parser("client", help="join a federation as a site (Flower SuperNode)")
    p.add_argument("dataset", help="this site's dataset folder (it never leaves the site)")
    p.add_argument("--server", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--certs", required=True, help="folder with the federation's ca.crt")
    p.add_argument("--key", required=True, help="this site's private key (nodes/<site>.key)")
    p.add_argument("-w", "--work-dir", required=True, help="this site's private work folder")
    p.add_argument("--name", default="site", help="this site's name in logs")
    p.add_argument("--runtime-port", type=int, help="local port of the SuperNode's app API")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads for training")
    p.set_defaults(handler=run_client)

    p = fed.add_parser("simulate", help="split one dataset into sites and federate on this machine")
    p.add_argument("dataset")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument(
        "--split-by",
        default="0",
        help="a seed (random equal split), 'dtype' (image data type groups) or a JSON {case: site}",
    )
    p.add_argument("--split-file", help="medseg split JSON: only its fold-0 train cases")
    p.add_argument(
        "--deployment",
        action="store_true",
        help="run the real Flower deployment on loopback (TLS, keys, one process per site)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads per site")
    _add_round_options(p)
    p.set_defaults(handler=run_simulate)


def run_certs(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    print_json(
        api.federated_certs(
            args.output, sites=args.sites, hosts=args.hosts, overwrite=args.overwrite
        )
    )
    return 0


def run_server(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    history = api.federated_server(
        args.output,
        certs_dir=args.certs,
        config=_config(args),
        host=args.host,
        port=args.port,
        connect_host=args.connect_host,
    )
    print_json({"final_model": history.get("final_model"), "rounds": len(history["rounds"])})
    return 0


def run_client(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    return api.federated_client(
        args.dataset,
        server=args.server,
        certs_dir=args.certs,
        key=args.key,
        work_dir=args.work_dir,
        name=args.name,
        runtime_port=args.runtime_port,
        device=args.device,
        num_threads=args.threads,
    )


def run_simulate(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    history = api.federated_simulate(
        args.dataset,
        args.output,
        sites=args.sites,
        split_by=args.split_by,
        config=_config(args),
        split_file=args.split_file,
        deployment=args.deployment,
        num_threads=args.threads,
    )
    print_json({"final_model": history.get("final_model"), "rounds": history["rounds"]})
    return 0
