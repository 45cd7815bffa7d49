"""Data-parallel training under ``torchrun``: the trainers run unchanged, one process per device.

    torchrun --nproc-per-node 2 -m patchflannel.learners.train --packs ... --out runs/l0
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m patchflannel.segment.train ...

Each trainer calls `setup`: without torchrun's variables it is a single process and
nothing changes. Under torchrun the process group starts (gloo on CPU, nccl on CUDA, one
GPU per local rank) and the model is wrapped in ``DistributedDataParallel``. Every rank
draws the same global batch from the same seeded generator and trains on its contiguous
share of it, so with the same batch size and seed a run on n processes takes the same
steps as a run on one (the effective batch is the configured one, not n times it).
BatchNorm statistics are those of the global batch: PyTorch's ``SyncBatchNorm`` on GPU,
`CpuSyncBatchNorm` on CPU (PyTorch's is GPU-only), so a BatchNorm network trains on
n processes as on one, to float rounding. Rank 0 validates, logs, checkpoints and writes the bundle; the
others follow its validation scores, so early stopping and resuming agree everywhere.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CpuSyncBatchNorm", "Distributed", "convert_cpu_sync_batchnorm", "setup", "unwrap", "wrap"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (the first ranks take one more when
        it does not divide)."""
        if not self.active:
            return batch
        bounds = [len(batch) * r // self.world for r in range(self.world + 1)]
        return batch[bounds[self.rank]:bounds[self.rank + 1]]

    def from_main(self, compute):
        """``compute()`` run on rank 0 only, its result on every rank (any picklable object)."""
        if not self.active:
            return compute()
        box = [compute() if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun job if there is one; returns this process's place and its device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size()), device


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all processes.

    Per channel, the sums of x and x^2 and the count are all-reduced with the differentiable
    ``torch.distributed.nn.all_reduce``, so the backward pass also carries every rank's
    share of the gradient through the shared mean and variance (what ``SyncBatchNorm`` does
    on GPU). Running statistics are updated as ``BatchNorm2d`` does, with the unbiased
    variance of the global batch. Outside training, or in a single process, it is a plain
    ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn import all_reduce

        x32 = x.float()
        count = torch.tensor([x32.numel() / x32.shape[1]], dtype=torch.float32)
        with warnings.catch_warnings():  # deprecated in favour of a private module; still the differentiable one
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([x32.sum((0, 2, 3)), (x32 * x32).sum((0, 2, 3)), count]))
        c = x32.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(float(n) - 1, 1.0))
        y = (x32 - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by a `CpuSyncBatchNorm` holding the
    same parameter and buffer tensors (an optimizer built before keeps working)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_cpu_sync_batchnorm(child)
    return module


def wrap(model: nn.Module, place: Distributed, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel``, its BatchNorm layers synchronised, when distributed."""
    if not place.active:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = convert_cpu_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
