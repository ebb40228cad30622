"""This process's place in the job: rank, stage, device and backend, from the torchrun env."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from pipedni.config import Config
from pipedni.errors import LaunchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str  # "nccl", or "gloo" (CPU tensors; GPU tensors staged through host memory); "none": no torchrun
    num_replicas: int = 1  # dist.data_parallel: copies of the pipeline, each on its share of the batch

    # [Note: ranks of a replicated pipeline]
    # Rank = replica x num_stages + stage: a replica's stages are neighbouring ranks (on one node
    # when they fit), and stage i's replicas are ranks i, N + i, 2N + i... The mesh of
    # ``device_mesh`` has the dimensions ("dp", "pp") in that order: pp is the inner one.

    @property
    def num_stages(self) -> int:
        return self.world_size // self.num_replicas

    @property
    def stage_index(self) -> int:
        return self.rank % self.num_stages

    @property
    def replica(self) -> int:
        return self.rank // self.num_stages

    @property
    def leads(self) -> bool:
        """Whether this process's replica is the one that evaluates, logs, writes the checkpoints
        and the summary (replica 0; every replica holds the same weights)."""
        return self.replica == 0

    def rank_of(self, stage_index: int, replica: Optional[int] = None) -> int:
        """The global rank of ``stage_index`` in ``replica`` (this process's by default)."""
        return (self.replica if replica is None else replica) * self.num_stages + stage_index

    @property
    def who(self) -> str:
        """This stage in messages: ``stage i/N`` (and its replica, if there are several)."""
        copies = f" (replica {self.replica}/{self.num_replicas})" if self.num_replicas > 1 else ""
        return f"stage {self.stage_index}/{self.num_stages}{copies}"

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def distributed(self) -> bool:
        return self.backend != "none"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def choose_device(cfg: Config, local_rank: int, local_world_size: int) -> tuple[torch.device, str]:
    """(device, backend). See [Note: transport layout] on backends."""
    want_cuda = cfg.dist.device == "cuda" or (cfg.dist.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        if cfg.dist.backend == "nccl":
            raise LaunchError("dist.backend = 'nccl' needs CUDA devices; use dist.backend=gloo on CPU")
        return torch.device("cpu"), "gloo"
    num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        raise LaunchError("dist.device = 'cuda' but no CUDA device is visible; use --dist.device=cpu")
    device = torch.device("cuda", local_rank % num_gpus)
    shared = local_world_size > num_gpus
    if shared and cfg.dist.backend == "nccl":
        raise LaunchError(
            f"{local_world_size} processes share {num_gpus} GPU(s) and NCCL needs one GPU per rank; "
            "use --dist.backend=gloo (host staging) or fewer processes per node"
        )
    if shared:
        log.warning("%d processes share %d GPU(s): using gloo with host staging", local_world_size, num_gpus)
    return device, "gloo" if shared or cfg.dist.backend == "gloo" else "nccl"


def restart_attempt() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's processes: 0 first."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def restart_store(world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """After a torchrun restart (``--max-restarts``), the agent's store with this attempt's own
    key prefix; None (torch's default) on the first attempt.

    The ranks of a restarted job meet in the store of the agent that restarted them, which still
    holds the keys of the attempt before: gloo then reads a killed rank's old address and fails
    with "Connection refused" (torch issue 167288). A prefix per attempt keeps the attempts apart.
    """
    attempt = restart_attempt()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts a new one
    if attempt == 0 or not agent_store or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"pipedni/attempt{attempt}", store)


def init_runtime(cfg: Config) -> Runtime:
    """Pin the device from LOCAL_RANK, then init the default process group (when under torchrun)."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank, local_world_size = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    device, backend = choose_device(cfg, local_rank, local_world_size)
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    replicas = cfg.dist.data_parallel
    if world_size % replicas:
        raise LaunchError(f"dist.data_parallel = {replicas} replicas do not divide the {world_size} processes started; "
                          f"start a multiple of {replicas} (stages x replicas) or change dist.data_parallel")
    if not under_torchrun:
        return Runtime(0, 1, 0, 1, device, "none")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.dist.timeout_sec)
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                    store=restart_store(world_size, timeout))
        except RuntimeError as err:  # DistNetworkError and friends: the rendezvous never completed
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise LaunchError(
                f"rank {rank} could not join the {world_size}-process group at {where} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); check that every process started, "
                "that the address and port are reachable, and dist.timeout_sec"
            ) from None
    return Runtime(rank, world_size, local_rank, local_world_size, device, backend, replicas)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
