"""Training under torch.distributed (2 CPU processes, gloo) against one process, same batch and seed."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from patchflannel.training.distributed import Distributed

pytestmark = pytest.mark.slow  # trains models or starts clusters: minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, task, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        task(*args)
    finally:
        torch.distributed.destroy_process_group()


def _run(world, task, *args):
    mp.spawn(_worker, args=(world, _free_port(), task, args), nprocs=world, join=True)


def test_share_splits_a_batch_into_contiguous_parts():
    batch = torch.arange(7)
    parts = [Distributed(r, 3).share(batch).tolist() for r in range(3)]
    assert parts == [[0, 1], [2, 3], [4, 5, 6]] and Distributed().share(batch) is batch


def _fit_module(out):
    from patchflannel.ensemble.fit import fit_weight_module

    probs, labels = _stacking_data()
    module = fit_weight_module(probs, labels)
    if torch.distributed.get_rank() == 0:
        torch.save(module.state_dict(), out)


def _stacking_data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 4
    return torch.softmax(torch.randn(120, 5, 4, generator=g) + torch.nn.functional.one_hot(labels, 4)[:, None], -1), labels


def _segmenter_then_module(data_dir, out, module_out):
    """One pair of processes for both trainers (starting processes costs more than the training)."""
    _train_segmenter(data_dir, out)
    _fit_module(module_out)


@pytest.fixture(scope="module")
def two_processes(lungseg_dir, tmp_path_factory):
    """The segmenter trained and the weight module fitted by 2 processes: their output folder."""
    out = tmp_path_factory.mktemp("ddp")
    _run(2, _segmenter_then_module, lungseg_dir, out / "two", out / "module.pt")
    return out


def test_weight_module_on_two_processes_matches_one(two_processes):
    from patchflannel.ensemble.fit import fit_weight_module

    single = fit_weight_module(*_stacking_data()).state_dict()
    ddp = torch.load(two_processes / "module.pt", weights_only=True)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-4, rtol=1e-4)


def _update_difference(one: dict, two: dict, init: dict) -> float:
    """Median over tensors of ||update_2 - update_1|| / ||update_1||."""
    ratios = []
    for name, a in one.items():
        if a.dtype.is_floating_point and "running" not in name:
            update = (a - init[name]).norm()
            if update > 0:
                ratios.append(float((a - two[name]).norm() / update))
    return float(np.median(ratios))


def _seg_config():
    from patchflannel.segment.train import SegTrainConfig

    # fp32 (bf16 rounding alone would differ), no dropout (its masks depend on how the batch is split)
    return SegTrainConfig(size=64, epochs=1, batch_size=8, lr=3e-3, amp=False,
                          architecture={"type": "fcdensenet", "preset": "fcdensenet_lite", "overrides": {"dropout": 0.0}})


def _train_segmenter(data_dir, out):
    from patchflannel.segment.train import train

    train(data_dir, out, _seg_config(), device="cpu", progress=False, limit=16)


def test_segmenter_on_two_processes_matches_one(lungseg_dir, two_processes, tmp_path):
    """Two AdamW steps of a BatchNorm network: the same updates to float rounding (the
    BatchNorm statistics are the global batch's on every rank)."""
    from patchflannel.segment import build_segmentation_model
    from patchflannel.training.loop import seed_everything

    _train_segmenter(lungseg_dir, tmp_path / "one")
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(two_processes / "two" / "checkpoint.pt", weights_only=True)
    seed_everything(0)
    init = build_segmentation_model(_seg_config().architecture).state_dict()
    assert _update_difference(one["model"], two["model"], init) < 0.02
    assert (tmp_path / "one" / "split.csv").read_text() == (two_processes / "two" / "split.csv").read_text()
    assert (two_processes / "two" / "bundle" / "config.json").is_file() and len(json.loads(two["history"])) == 1


def test_learner_training_runs_unchanged_under_torchrun(training_packs, tmp_path):
    """The CLI under torchrun takes the step one process takes. (fp32 and contiguous layout:
    on this CPU channels_last alone moves BatchNorm gradients by ~1 %, in one process too; and
    one step, since AdamW's first steps turn rounding-level gradient differences into sign
    flips of near-zero coordinates.)"""
    common = ["-m", "patchflannel.learners.train", "--packs", *map(str, training_packs), "--learner", "resnet18",
              "--epochs", "1", "--batch-size", "8", "--patches-per-image", "2", "--limit", "4", "--val-k", "2",
              "--no-amp", "--no-channels-last", "--device", "cpu", "--no-progress"]  # fp32, plain layout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *common,
                    "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    from patchflannel.learners.train import main as train_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process; the same command line, in this process
    try:
        assert train_main([*common[2:], "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    from patchflannel.learners import create_learner

    torch.manual_seed(0)
    init = create_learner("resnet18", 4).state_dict()
    assert _update_difference(one["model"], two["model"], init) < 0.02
    for name in ("split.csv", "history.json"):
        assert (tmp_path / "two" / name).is_file()
    assert json.loads((tmp_path / "two" / "bundle" / "config.json").read_text())["training"]["learner"] == "resnet18"
