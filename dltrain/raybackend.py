"""Ray Train's torch backend, without torch in the processes that only steer the run.

TorchTrainer's TorchConfig lives in a module that imports torch (~1.5 s of CPU), and Ray Train
unpickles it in the Train controller: the controller's start, which every worker waits for,
paid for a torch import it never uses, and so did the driver that built the trainer. This
backend sets up the same process group as Ray's (gloo on CPUs, NCCL on GPUs, an env://
rendezvous at rank 0's address, the torchrun environment variables), with the functions of
ray.train.torch.config, named here and imported only inside the workers.

torch is imported by the workers alone; tests/test_train.py checks that the controller does not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.util import TrainingFramework

from dltrain.rayenv import wait_for_preload

log = logging.getLogger(__name__)


def _in_worker(function: str, *args: Any, **kwargs: Any) -> Any:
    """Run one of ray.train.torch.config's functions in a worker (where torch is imported)."""
    wait_for_preload()
    from ray.train.torch import config

    return getattr(config, function)(*args, **kwargs)


def _set_rendezvous(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class CudaDeviceContext:
    """Each worker's training function runs with its own GPU as the default CUDA device."""

    def __enter__(self) -> None:
        wait_for_preload()
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        self._inner.__enter__()

    def __exit__(self, *exc: object) -> bool:
        return self._inner.__exit__(*exc)


class TorchProcessGroupBackend(Backend):
    share_cuda_visible_devices = True

    def on_start(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_rendezvous, addr=addr, port=port)
        worker_group.execute(_in_worker, "_set_torch_distributed_env_vars")
        world_size = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, _in_worker, "_setup_torch_process_group", backend=backend, world_rank=rank,
            world_size=world_size, init_method="env://", timeout_s=backend_config.timeout_s)
            for rank in range(world_size)])

    def on_shutdown(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        futures = worker_group.execute_async(_in_worker, "_shutdown_torch",
                                             destroy_process_group=len(worker_group) > 1)
        timeout_s = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            log.warning("torch process group shutdown timed out after %s seconds", timeout_s)


@dataclass
class TorchBackendConfig(BackendConfig):
    """TorchConfig's settings that dltrain uses: the backend (None: NCCL with GPUs, else gloo)
    and the collective timeout."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return TorchProcessGroupBackend

    @property
    def train_func_context(self) -> type:
        return CudaDeviceContext

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
