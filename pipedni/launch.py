"""``python -m pipedni.launch --nproc_per_node N CONFIG.yaml [--section.key=value ...]``: one node, N stages.

A thin wrapper around torchrun's launcher for the common single-node case. It checks the
config before starting any process (a mistake costs one line, not N), sets each stage's
OMP thread count, and on failure exits with the failing stage's own exit code (2 for a
user mistake) after that stage's one-line error, instead of torchrun's exit code 1 and
traceback summary. Multi-node jobs use torchrun directly (see docs/usage.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

from pipedni.config import load_config
from pipedni.errors import USER_ERRORS
from pipedni.schedules.registry import check_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m pipedni.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc_per_node", "-n", type=int, required=True, help="number of processes: stages x dist.data_parallel")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart every stage from the latest checkpoint this many times after a failure")
    parser.add_argument("config", help="YAML config file")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def launch(nproc: int, config: str, overrides: list[str], max_restarts: int = 0) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the stages print their own errors
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts, monitor_interval=0.1,
    )
    try:
        elastic_launch(launch_config, sys.executable)("-u", "-m", "pipedni.train", config, *overrides)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode < 0:  # killed by a signal: it printed nothing, and its neighbours were stopped
            print(f"error: stage {first.local_rank} was killed by {first.signal_name()}", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_config(load_config(args.config, overrides))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.nproc_per_node < 1:
        print(f"error: --nproc_per_node = {args.nproc_per_node}; need at least 1", file=sys.stderr)
        return 2
    replicas = load_config(args.config, overrides).dist.data_parallel
    if args.nproc_per_node % replicas:
        print(f"error: --nproc_per_node = {args.nproc_per_node} processes do not divide into dist.data_parallel = "
              f"{replicas} replicas; start a multiple of {replicas} (stages x replicas)", file=sys.stderr)
        return 2
    if args.max_restarts < 0:
        print(f"error: --max-restarts = {args.max_restarts}; need 0 or more", file=sys.stderr)
        return 2
    return launch(args.nproc_per_node, args.config, overrides, args.max_restarts)


if __name__ == "__main__":
    sys.exit(main())
