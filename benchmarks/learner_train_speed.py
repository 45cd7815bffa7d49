"""Where a patch learner's training time goes, and what the cached trunk saves. Prints JSON.

    python benchmarks/learner_train_speed.py --learners efficientnet_lite0 efficientnet_lite1 efficientnet_lite2 \
        --out benchmarks/results/learner_train_speed.json

Per learner, patches per second on this machine (medians of ``--repeats`` timed calls after a
warm-up, float32, channels_last, all threads):

* ``full_step``: one training step of the earlier recipe (ImageNet start, the input-side 30 %
  of parameter tensors frozen, batch 32: forward, loss, backward, AdamW), model only;
* ``augment``: the training data path of one patch (lung patch cut from a 1024 px film and
  augmented), which the earlier trainer paid on every step and the training bank pays once;
* ``trunk_torch`` / ``trunk_onnxruntime``: the frozen trunk (stem + ``--frozen-blocks``
  stages) forward, which the banks pay once per patch;
* ``top_step``: one training step of the cached-trunk trainer (the rest of the network on
  cached activations, batch 64), what every epoch pays.

Ratios are against ``full_step`` of the same learner, in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _report import emit  # benchmarks/ is first on sys.path when a script runs


def _rate(fn, items: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return items / statistics.median(times)


def measure(name: str, frozen_blocks: int, repeats: int, tmp: Path) -> dict:
    from patchflannel.learners.cached import TrunkRunner, split_trunk
    from patchflannel.learners.data import MaskedSet, draw_patches
    from patchflannel.learners.registry import create_learner
    from patchflannel.training.augment import Augmentation

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 224, 224, generator=generator).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (32,), generator=generator)
    model = create_learner(name, weights="imagenet").to(memory_format=torch.channels_last).train()
    params = list(model.parameters())
    for p in params[: int(len(params) * 0.3)]:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)

    def full_step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    report = {"full_step": _rate(full_step, 32, repeats)}

    films = torch.zeros(4, 1024, 1024, dtype=torch.uint8)
    films[:, 200:800, 150:850] = torch.randint(1, 255, (4, 600, 700), generator=generator, dtype=torch.uint8)
    data = MaskedSet(films, films > 0, torch.zeros(4, dtype=torch.long).numpy(), [{}] * 4)
    augmentation = Augmentation.parse("standard")
    report["augment"] = _rate(lambda: augmentation(draw_patches(data, torch.arange(4), 8, 224, generator, 1000),
                                                   generator, keep_zero=True), 32, repeats)

    fresh = create_learner(name, weights="imagenet").eval()
    trunk, top = split_trunk(fresh, frozen_blocks)
    torch_runner = TrunkRunner(trunk, tmp, 224, torch.device("cpu"), onnx=False)
    report["trunk_torch"] = _rate(lambda: torch_runner(x), 32, repeats)
    try:
        onnx_runner = TrunkRunner(trunk, tmp / name, 224, torch.device("cpu"), onnx=True)
        report["trunk_onnxruntime"] = _rate(lambda: onnx_runner(x), 32, repeats)
    except ImportError:
        report["trunk_onnxruntime"] = None
    features = torch.from_numpy(torch_runner(torch.cat([x, x])).astype("float32")).contiguous(
        memory_format=torch.channels_last)
    labels = torch.cat([y, y])
    top = top.train()
    top_optimizer = torch.optim.AdamW(top.parameters(), lr=1e-3)

    def top_step():
        loss = torch.nn.functional.cross_entropy(top(features), labels)
        top_optimizer.zero_grad()
        loss.backward()
        top_optimizer.step()

    report["top_step"] = _rate(top_step, 64, repeats)
    report = {k: None if v is None else round(v, 1) for k, v in report.items()}
    report["top_step_over_full_step"] = round(report["top_step"] / report["full_step"], 1)
    best_trunk = max(v for v in (report["trunk_torch"], report["trunk_onnxruntime"]) if v)
    report["onnxruntime_over_torch_trunk"] = (None if report["trunk_onnxruntime"] is None
                                             else round(report["trunk_onnxruntime"] / report["trunk_torch"], 2))
    # One pass over a patch: the earlier trainer augments and fine-tunes it every epoch; the
    # cached trainer augments and runs the trunk once, then only trains the top each epoch.
    report["earlier_seconds_per_patch_epoch"] = round(1 / report["full_step"] + 1 / report["augment"], 4)
    report["cached_seconds_per_patch_once"] = round(1 / best_trunk + 1 / report["augment"], 4)
    report["cached_seconds_per_patch_epoch"] = round(1 / report["top_step"], 4)
    return report


def main(argv=None) -> dict:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learners", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    p.add_argument("--frozen-blocks", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        learners = {name: measure(name, args.frozen_blocks, args.repeats, Path(tmp)) for name in args.learners}
    return emit({"benchmark": "learner_train_speed", "unit": "patches per second", "threads": torch.get_num_threads(),
                 "frozen_blocks": args.frozen_blocks, "repeats": args.repeats, "learners": learners}, args.out)


if __name__ == "__main__":
    main()
