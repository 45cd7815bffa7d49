"""Cost of one FC-DenseNet training step on this machine, per option. Prints JSON.

    python benchmarks/segment_train_speed.py --presets fcdensenet_lite,fcdensenet56 --sizes 128,160,256

For each preset x input size x variant: seconds per image of a full training step
(forward, Dice+BCE loss, backward, AdamW) at batch 8, median of ``--steps`` steps after a
warm-up step, and the peak resident memory of the process. Variants: ``fp32``;
``bf16_cl`` (bf16 autocast + channels_last); ``bf16_cl_memeff`` (the same with
memory-efficient dense blocks, which recompute concatenations in backward). Each
configuration runs in a fresh process so peak memory is its own. Ratios are against
``fp32`` of the same preset and size. Random data: the cost does not depend on content.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("fp32", "bf16_cl", "bf16_cl_memeff")


def one(preset: str, size: int, variant: str, batch: int, steps: int) -> dict:
    import torch

    from patchflannel.segment import create_fcdensenet
    from patchflannel.losses import dice_bce_loss

    torch.manual_seed(0)
    amp = variant != "fp32"
    net = create_fcdensenet(preset, memory_efficient=variant.endswith("memeff")).train()
    x = torch.randn(batch, 1, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()
    if amp:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            out = net(x)
        loss = dice_bce_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"s_per_image": statistics.median(times[1:]) / batch,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="fcdensenet_lite,fcdensenet56")
    p.add_argument("--sizes", default="128,160,256")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # preset,size,variant (child process)
    args = p.parse_args(argv)
    if args.one:
        preset, size, variant = args.one.split(",")
        print(json.dumps(one(preset, int(size), variant, args.batch, args.steps)))
        return {}
    rows = []
    for preset in args.presets.split(","):
        for size in map(int, args.sizes.split(",")):
            base = None
            for variant in args.variants.split(","):
                out = subprocess.run([sys.executable, __file__, "--one", f"{preset},{size},{variant}",
                                      "--batch", str(args.batch), "--steps", str(args.steps)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                base = base or r
                rows.append({"preset": preset, "params_m": round(r["params_m"], 2), "size": size, "variant": variant,
                             "s_per_image": round(r["s_per_image"], 3), "peak_rss_mib": round(r["peak_rss_mib"]),
                             "speedup_vs_fp32": round(base["s_per_image"] / r["s_per_image"], 2),
                             "memory_vs_fp32": round(r["peak_rss_mib"] / base["peak_rss_mib"], 2)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"batch": args.batch, "results": rows}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
