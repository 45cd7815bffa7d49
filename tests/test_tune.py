"""Ray Tune search over the patch learner's training loop, on a one-machine Ray (tiny budget)."""
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from patchflannel.learners.train import LearnerTrainConfig, train

pytest.importorskip("ray.tune", reason="pip install 'patchflannel[tune]'")

pytestmark = pytest.mark.slow  # trains models or starts clusters: minutes

PATCH = 96  # the 384 px packs of conftest.py
TINY = dict(learner="resnet18", patch_size=PATCH, epochs=2, batch_size=8, val_k=2, min_lung_pixels=100)


@pytest.fixture
def ray_local():
    """A one-machine Ray started in this process (what ``run_search`` does without an address)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 1024**2)
    yield None
    ray.shutdown()


@pytest.fixture
def ray_cluster(monkeypatch):
    """A running Ray head node, as a cluster would have, joined by address (loopback only, so
    without Ray's token authentication)."""
    import ray
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--object-store-memory=134217728", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_head(address)
        yield address
    finally:
        ray.shutdown()
        head.send_signal(signal.SIGTERM)  # --block: the head stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_head(address: str, timeout: float = 120) -> None:
    import ray
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            ray.shutdown()
            return
        except Exception:  # not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler, ray_fixture", [("asha", "ray_cluster"), ("pbt", "ray_local")])
def test_search_runs_trials_and_reports_macro_f1(request, packs, tmp_path, scheduler, ray_fixture):
    """ASHA against a running cluster by address, PBT on a Ray started in-process."""
    address = request.getfixturevalue(ray_fixture)
    from patchflannel.evaluation.splits import write_split
    from patchflannel.learners.data import read_rows
    from patchflannel.learners.data import make_split
    from patchflannel.tune import SEARCHED, run_search

    base = LearnerTrainConfig(**TINY)
    write_split(make_split(read_rows(packs), base), tmp_path / "split.csv")
    base.split_file = str(tmp_path / "split.csv")
    summary = run_search(packs, tmp_path / "out", base, scheduler=scheduler, samples=2, limit=8,
                         quantile=0.5, seed=1, address=address)
    assert len(summary["trials"]) == 2
    for trial in summary["trials"]:
        assert trial["error"] is None
        assert set(trial["config"]) == set(SEARCHED)
        assert trial["config"]["optimizer"] in ("adam", "sgd") and 1e-4 <= trial["config"]["lr"] <= 1e-2
        assert 1 <= trial["epochs"] <= 2 and 0 <= trial["best_val_macro_f1"] <= 1
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["scheduler"] == scheduler
    assert (tmp_path / "out" / "results.md").read_text().count("\n") == 2 + 2
    # every trial trained the library's own loop in its own folder, on the shared split
    histories = list((tmp_path / "out" / "ray").rglob("run/history.json"))
    assert len(histories) == 2
    if scheduler == "pbt":  # the trailing half continued from the leader's checkpoint, values in bounds
        from patchflannel.tune import BOUNDS
        assert summary["exploits"]
        for exploit in summary["exploits"]:
            assert exploit["trial"] != exploit["cloned"]
            for key, (low, high) in BOUNDS.items():
                assert low <= exploit["config"][key] <= high


def test_resuming_with_a_new_learning_rate_applies_it_from_there_on(packs, tmp_path):
    """What population-based training does to a trial: same checkpoint, perturbed values."""
    cfg = LearnerTrainConfig(**TINY, schedule="step", step_size=1, gamma=0.5, lr=1e-3, optimizer="sgd", momentum=0.9)
    train(packs, tmp_path / "run", cfg, device="cpu", progress=False, limit=8, max_epochs_this_run=1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)  # one decay
    perturbed = LearnerTrainConfig(**{**TINY, "epochs": 3}, schedule="step", step_size=1, gamma=0.5, lr=2e-3,
                                   optimizer="sgd", momentum=0.8, weight_decay=0.01)
    result = train(packs, tmp_path / "run", perturbed, device="cpu", progress=False, limit=8)
    # epoch 2 ran at 2e-3 x 0.5 (the decay carried over), then one more decay
    assert [h["lr"] for h in result["history"]] == pytest.approx([5e-4, 5e-4, 2.5e-4])
    group = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert group["momentum"] == pytest.approx(0.8) and group["weight_decay"] == pytest.approx(0.01)


def test_a_trial_handed_a_finished_checkpoint_still_reports(packs, tmp_path, monkeypatch):
    """PBT may hand a trial another trial's checkpoint after its last epoch: nothing is left to
    train, and the trial must still report that checkpoint's score (else it ends with none)."""
    from types import SimpleNamespace

    from patchflannel import tune as search

    cfg = LearnerTrainConfig(**{**TINY, "epochs": 1})
    train(packs, tmp_path / "donor", cfg, device="cpu", progress=False, limit=8)
    donor = json.loads((tmp_path / "donor" / "history.json").read_text())
    reports = []

    class Checkpoint:
        def __init__(self, folder):
            self.folder = folder

        @classmethod
        def from_directory(cls, folder):
            return cls(folder)

        def as_directory(self):
            from contextlib import nullcontext
            return nullcontext(self.folder)

    fake_tune = SimpleNamespace(
        get_context=lambda: SimpleNamespace(get_trial_dir=lambda: str(tmp_path / "trial")),
        get_checkpoint=lambda: Checkpoint(tmp_path / "donor"), Checkpoint=Checkpoint,
        report=lambda metrics, checkpoint: reports.append(metrics))
    monkeypatch.setattr(search, "_require_ray", lambda: (None, fake_tune))
    sampled = {k: getattr(cfg, k) for k in search.SEARCHED}
    search._run_trial(sampled, packs=[str(p) for p in packs], base=cfg, limit=8, device="cpu")
    assert len(reports) == 1 and reports[0]["epoch"] == 1
    assert reports[0][search.METRIC] == pytest.approx(donor[-1]["val_macro_f1"])
