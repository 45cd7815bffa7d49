"""Data-parallel training throughput, 1 process against n, and the gradient traffic per step. Prints JSON.

    python benchmarks/ddp_scaling.py --out benchmarks/results/ddp_scaling.json

For each model, the same global batch is trained for ``--steps`` timed steps (after
``--warmup``) by one process using all ``--cores`` threads, then by ``--processes``
processes under ``torch.distributed`` (gloo, ``patchflannel.training.distributed.wrap``: DDP with
synchronised BatchNorm) with ``cores / processes`` threads each; each rank computes its
share of the batch. Inputs are synthetic (training speed does not depend on pixel values).
Reported: images per second (median over ``--repeats``) and the ratio n-process / 1-process.

Communication: DDP all-reduces every trainable gradient each step (fp32). With a ring
all-reduce each rank sends and receives ``2 (n - 1) / n`` times the gradient bytes; the
report lists that volume for the ``lite`` and ``paper`` learners and the segmenters, and
the time it takes at a given link speed, to compare with a step's compute.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit

from patchflannel.learners import PRESETS, create_learner
from patchflannel.segment import build_segmentation_model

MODELS = {  # name: (builder, input side, loss)
    "resnet18": (lambda: create_learner("resnet18", 4), 224, "ce"),
    "efficientnet_lite0": (lambda: create_learner("efficientnet_lite0", 4), 224, "ce"),
    "fcdensenet_lite": (lambda: build_segmentation_model({"type": "fcdensenet", "preset": "fcdensenet_lite"}), 160, "bce"),
}


def _steps(model, batch: int, side: int, loss: str, steps: int, warmup: int, share) -> float:
    """Seconds for ``steps`` timed training steps on this rank's share of a ``batch``."""
    g = torch.Generator().manual_seed(0)
    x = share(torch.rand(batch, 1, side, side, generator=g))
    y = share(torch.randint(0, 4, (batch,), generator=g)) if loss == "ce" else share(
        (torch.rand(batch, 1, side, side, generator=g) > 0.5).float())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        out = model(x)
        loss_value = F.cross_entropy(out, y) if loss == "ce" else F.binary_cross_entropy_with_logits(out, y)
        opt.zero_grad(set_to_none=True)
        loss_value.backward()
        opt.step()
    return time.perf_counter() - t0


def _worker(rank, world, port, name, batch, steps, warmup, threads, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from patchflannel.training.distributed import setup, wrap

    place, device = setup(torch.device("cpu"))
    builder, side, loss = MODELS[name]
    torch.manual_seed(0)
    model = wrap(builder(), place, device)
    seconds = _steps(model, batch, side, loss, steps, warmup, place.share)
    if rank == 0:
        out.put(seconds)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, batch: int, steps: int, warmup: int, processes: int, cores: int) -> float:
    """Images per second of one run: one process (``processes == 1``) or a DDP job."""
    if processes == 1:
        torch.set_num_threads(cores)
        builder, side, loss = MODELS[name]
        torch.manual_seed(0)
        seconds = _steps(builder(), batch, side, loss, steps, warmup, lambda t: t)
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.spawn(_worker, args=(processes, _free_port(), name, batch, steps, warmup, max(1, cores // processes),
                                queue), nprocs=processes, join=True)
        seconds = queue.get()
    return batch * steps / seconds


def gradient_megabytes(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 / 1e6


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=16, help="global batch (images or patches) per step")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--link-gbit", type=float, default=100.0, help="link speed for the communication estimate")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    throughput = {}
    for name in args.models:
        runs = {n: [] for n in (1, args.processes)}
        for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both alike
            for n in runs:
                runs[n].append(measure(name, args.batch, args.steps, args.warmup, n, args.cores))
        one, many = statistics.median(runs[1]), statistics.median(runs[args.processes])
        throughput[name] = {"images_per_s_1_process": round(one, 2),
                            f"images_per_s_{args.processes}_processes": round(many, 2),
                            "ratio": round(many / one, 3), "runs": {str(k): [round(v, 2) for v in vs]
                                                                    for k, vs in runs.items()}}
    traffic = {}
    models = {**{n: lambda n=n: create_learner(n, 4) for n in PRESETS["lite"] + PRESETS["paper"]},
              "fcdensenet_lite": MODELS["fcdensenet_lite"][0],
              "fcdensenet103": lambda: build_segmentation_model({"type": "fcdensenet", "preset": "fcdensenet103"})}
    for name, build in models.items():
        mb = gradient_megabytes(build())
        per_rank = {n: round(2 * (n - 1) / n * mb, 1) for n in (2, 8, 16)}
        traffic[name] = {"gradient_mb": round(mb, 1), "ring_allreduce_mb_per_rank": per_rank,
                         f"ms_at_{args.link_gbit:g}_gbit_for_8": round(per_rank[8] * 8 / (args.link_gbit * 1e3) * 1e3, 1)}
    report = {"cores": args.cores, "processes": args.processes, "global_batch": args.batch, "steps": args.steps,
              "throughput": throughput, "communication_per_step": traffic}
    return emit(report, args.out)


if __name__ == "__main__":
    main()
