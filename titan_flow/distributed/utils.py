"""Process-group and device-mesh set-up shared by training, sampling and export.

A single process (plain `python -m titan_flow.train`) still gets a one-rank process group, so the
collectives, DCP and the FSDP2 code path are the same from a laptop to 32 GPUs (FSDP2 itself is left
out where it would shard and cast nothing: distributed/parallelize.py, `fsdp_is_a_no_op`).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule

from titan_flow.config import ConfigError, JobConfig


@dataclass
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    dp_replicate: int
    dp_shard: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """1-D shard mesh for FSDP, or the 2-D (replicate, shard) mesh for HSDP."""
        return self.mesh if self.dp_replicate > 1 else self.mesh["dp_shard"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(cfg: JobConfig, local_rank: int) -> torch.device:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: 'cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_degrees(cfg: JobConfig, world_size: int) -> tuple[int, int]:
    p = cfg.parallelism
    replicate = p.data_parallel_replicate_degree
    shard = p.data_parallel_shard_degree
    if replicate < 1:
        raise ConfigError(f"parallelism.data_parallel_replicate_degree must be >= 1, got {replicate}")
    if shard == -1:
        if world_size % replicate:
            raise ConfigError(
                f"parallelism.data_parallel_replicate_degree ({replicate}) must divide the world size ({world_size})"
            )
        shard = world_size // replicate
    if replicate * shard != world_size:
        raise ConfigError(
            f"parallelism: replicate ({replicate}) x shard ({shard}) must equal the world size ({world_size}); "
            "set data_parallel_shard_degree = -1 to fill it automatically"
        )
    return replicate, shard


def init_distributed(cfg: JobConfig) -> ParallelDims:
    """Initialise the default process group (nccl on CUDA, gloo on CPU) and the data-parallel mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg, local_rank)
    backend = cfg.parallelism.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallelism.backend: 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    timeout = datetime.timedelta(seconds=cfg.parallelism.timeout_seconds)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            init_method = "env://"
        else:
            if world_size != 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is unset: launch with torchrun")
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    if world_size > 1 and "MASTER_ADDR" in os.environ:
        FailureRelay.install(rank)
    replicate, shard = resolve_degrees(cfg, world_size)
    mesh = init_device_mesh(
        device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")
    )
    return ParallelDims(world_size, rank, local_rank, replicate, shard, device, mesh)


class FailureRelay:
    """When one rank fails, every rank stops within seconds, logging that rank's error (rank 0 included).

    A rank whose Python code raises posts its traceback in the launcher's TCP store (through
    sys.excepthook, so no entry point needs to know); a daemon thread on every rank polls the key and,
    on another rank's failure, logs it and exits the process. Without it the other ranks would sit in
    a collective until `parallelism.timeout_seconds` and then report only a timeout. A rank that dies
    without a traceback (killed, segfault) still ends the job through that timeout or the launcher.

    The thread is stopped and joined before the process group goes (`destroy_distributed`) and at exit:
    a daemon thread still inside a store call when the interpreter finalizes is unwound through C++
    frames, which aborts the process ("terminate called without an active exception", SIGABRT), so a
    run that finished could exit with a signal now and then.
    """

    active: FailureRelay | None = None

    def __init__(self, rank: int, poll_seconds: float):
        self.rank = rank
        self.key = f"titan_flow/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=datetime.timedelta(seconds=60),
        )
        self.poll_seconds = poll_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="titan_flow-failure-relay", daemon=True)

    @classmethod
    def install(cls, rank: int, poll_seconds: float = 1.0) -> FailureRelay:
        relay = cls(rank, poll_seconds)
        previous = sys.excepthook

        def hook(kind, value, tb):
            first = relay.post("".join(traceback.format_exception(kind, value, tb)))
            previous(kind, value, tb)
            sys.stderr.flush()
            if first:  # stay connected until the others have read it, so they stop with this cause
                time.sleep(2 * relay.poll_seconds)  # rather than with a collective's "connection closed"

        sys.excepthook = hook
        relay.thread.start()
        atexit.register(relay.stop)
        cls.active = relay
        return relay

    def stop(self) -> None:
        """End the watch and wait for it (it stops within one store call), so no thread is left inside the store."""
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=60)  # the store's own timeout bounds the call it may be in

    def post(self, text: str) -> bool:
        """Record this rank's failure unless another rank's came first (then name that one as the cause).
        True when this rank's failure is the one recorded."""
        mine = f"rank {self.rank} failed:\n{text}"
        try:
            first = self.store.compare_set(self.key, "", mine).decode()
        except Exception:  # the store is gone: the job is already being torn down
            return False
        if first != mine:
            print(f"[rank{self.rank}] this error follows an earlier failure; root cause: {first}", file=sys.stderr)
        return first == mine

    def watch(self) -> None:
        try:
            while not self.store.check([self.key]):
                if self.stopped.wait(self.poll_seconds):
                    return
            message = self.store.get(self.key).decode()
        except Exception:  # the store closed: the job has ended
            return
        if message.startswith(f"rank {self.rank} failed"):
            return
        logging.getLogger("titan_flow").error("stopping rank %d because %s", self.rank, message)
        os._exit(1)


def destroy_distributed() -> None:
    if FailureRelay.active is not None:
        FailureRelay.active.stop()
        FailureRelay.active = None
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor over ranks in rank order (same shape on every rank)."""
    if dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_gather_object(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def reshard(model: torch.nn.Module) -> None:
    """Drop the gathered full weights FSDP2 keeps after a no-grad forward (reshard_after_forward=False).

    Call before writing parameters in place outside the optimizer (swapping EMA weights in or out):
    a later forward would otherwise reuse the stale gathered copy instead of the new shards.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad norm over (possibly sharded DTensor) grads; clips in place when max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=True)
    return total


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_flag(tensors) -> torch.Tensor:
    """0-d bool tensor (no host sync): does any local part of `tensors` hold a NaN or an infinity?

    One fused max-abs over all of them (foreach kernels): it is infinite or NaN exactly when some
    element is, and unlike a 2-norm it cannot overflow on large finite values."""
    parts = [local_tensor(t).detach() for t in tensors]
    parts = [p for p in parts if p.numel()]
    if not parts:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.nn.utils.get_total_norm(parts, norm_type=float("inf"), foreach=True))
