"""Cost of one FC-DenseNet training step on this machine, per option. Prints JSON.

    python benchmarks/segment_train_speed.py --presets fcdensenet_lite,fcdensenet56 --sizes 128,160,256

For each preset x input size: seconds per image of a full training step (forward,
Dice+BCE loss, backward, AdamW) at batch 8, in float32 and in bf16 autocast with
channels_last, median of ``--steps`` steps after a warm-up step; and the speed-up of
bf16+channels_last over float32. Random data: the cost does not depend on content.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from patchflannel.segment import create_fcdensenet
from patchflannel.segment.train import dice_bce_loss


def seconds_per_image(preset: str, size: int, amp: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    net = create_fcdensenet(preset).train()
    if amp:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(batch, 1, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
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
    return statistics.median(times[1:]) / batch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="fcdensenet_lite,fcdensenet56")
    p.add_argument("--sizes", default="128,160,256")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        params = sum(q.numel() for q in create_fcdensenet(preset).parameters())
        for size in map(int, args.sizes.split(",")):
            fp32 = seconds_per_image(preset, size, False, args.batch, args.steps)
            bf16 = seconds_per_image(preset, size, True, args.batch, args.steps)
            rows.append({"preset": preset, "params_m": round(params / 1e6, 2), "size": size,
                         "fp32_s_per_image": round(fp32, 3), "bf16_channels_last_s_per_image": round(bf16, 3),
                         "speedup": round(fp32 / bf16, 2)})
    report = {"threads": torch.get_num_threads(), "batch": args.batch, "results": rows}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
