"""Hyper-parameter search for the patch learners with Ray Tune (``pip install 'patchflannel[tune]'``).

    python -m patchflannel.tune --packs runs/masked/cxr4.h5 --learner efficientnet_lite0 \\
        --weights imagenet --scheduler asha --samples 8 --epochs 4 --out runs/tune-asha

Every trial is one `patchflannel.learners.train.train` run (the library's own training
loop, seeded, checkpointed every epoch) on the same patient split; after each epoch it reports
its validation macro-F1 and its checkpoint to Tune. The search space (`search_space`)
covers the optimiser (Adam or SGD), learning rate, step-decay step size and gamma, momentum,
weight decay and patches per image per step. Two schedulers:

* ``asha``: asynchronous successive halving stops the trials whose macro-F1 trails at epochs
  ``grace``, ``grace * 2``, ... (random search otherwise);
* ``pbt``: population-based training (synchronous): every ``--perturbation-interval`` epochs
  the worst quarter (``--quantile``) of the trials restart from a copy of a best-quarter trial's checkpoint, with its
  learning rate, momentum and weight decay perturbed (x0.8 / x1.2) or resampled.

Without ``--address`` Ray starts on this machine with ``--cpus`` CPUs (``--cpus-per-trial``
each); ``--address auto`` or ``ray://host:10001`` joins a running Ray cluster (the packs must
be readable at the same path on every node). The result is ``results.json`` (every trial's
configuration, best and last macro-F1 and epochs) and ``results.md`` under ``--out``.
"""
from __future__ import annotations

import sys
import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from .learners.train import LearnerTrainConfig, recipe_config
from .errors import run_command

__all__ = ["BOUNDS", "METRIC", "MUTATED", "SEARCHED", "clip_to_bounds", "main", "results_table",
           "run_search", "search_space", "trial_config"]

log = logging.getLogger(__name__)

#: Configuration keys the search varies (the rest of the trial's configuration is fixed).
SEARCHED = ("optimizer", "lr", "step_size", "gamma", "momentum", "weight_decay", "patches_per_image")
#: Of those, what population-based training perturbs mid-run (the others fix the run's shape).
MUTATED = ("lr", "momentum", "weight_decay")
METRIC = "val_macro_f1"


def _require_ray():
    try:
        import ray
        from ray import tune
    except ImportError as e:  # an optional extra
        raise ImportError("hyper-parameter search needs Ray Tune: pip install 'patchflannel[tune]'") from e
    return ray, tune


#: The bounds of the continuous values: PBT's x0.8 / x1.2 perturbations are clipped to them
#: (Ray does not clip, and a momentum of 1.17 diverges).
BOUNDS = {"lr": (1e-4, 1e-2), "gamma": (0.1, 0.9), "momentum": (0.8, 0.99), "weight_decay": (1e-5, 1e-1)}


def clip_to_bounds(config: dict) -> dict:
    """``config`` with every value of `BOUNDS` clipped into its range (PBT's explore step)."""
    for key, (low, high) in BOUNDS.items():
        if key in config:
            config[key] = min(max(config[key], low), high)
    return config


def search_space(epochs: int) -> dict:
    """The Ray Tune search space: Adam or SGD, log-uniform learning rate 1e-4-1e-2, step decay
    every 1..``epochs`` epochs by gamma 0.1-0.9, momentum 0.8-0.99, log-uniform weight decay
    1e-5-1e-1, and 1, 2 or 4 patches per image per step (the batch stays ``batch_size`` patches)."""
    _, tune = _require_ray()
    return {
        "optimizer": tune.choice(["adam", "sgd"]),
        "lr": tune.loguniform(*BOUNDS["lr"]),
        "step_size": tune.randint(1, max(epochs, 1) + 1),
        "gamma": tune.uniform(*BOUNDS["gamma"]),
        "momentum": tune.uniform(*BOUNDS["momentum"]),
        "weight_decay": tune.loguniform(*BOUNDS["weight_decay"]),
        "patches_per_image": tune.choice([1, 2, 4]),
    }


def trial_config(base: LearnerTrainConfig, sampled: dict) -> LearnerTrainConfig:
    """``base`` with a trial's sampled values, the step-decay schedule and no early stopping
    (the Tune scheduler decides when a trial stops)."""
    unknown = set(sampled) - set(SEARCHED)
    if unknown:
        raise ValueError(f"not searchable: {sorted(unknown)}")
    return replace(base, **sampled, schedule="step", patience=base.epochs + 1)


def _run_trial(sampled: dict, *, packs: list[str], base: LearnerTrainConfig, limit: int | None,
               device: str) -> None:
    """One Tune trial: train with the sampled values, report after every epoch; under PBT start
    from the checkpoint Tune hands over (another trial's, with perturbed values)."""
    _, tune = _require_ray()
    from .learners.train import train

    cfg = trial_config(base, sampled)
    out_dir = Path(tune.get_context().get_trial_dir()) / "run"
    out_dir.mkdir(parents=True, exist_ok=True)
    handed = tune.get_checkpoint()
    if handed is not None:
        with handed.as_directory() as folder:
            shutil.copy(Path(folder) / "checkpoint.pt", out_dir / "checkpoint.pt")

    reported = []

    def report(entry: dict, checkpoint_path: Path) -> None:
        reported.append(entry["epoch"])
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(checkpoint_path, Path(folder) / "checkpoint.pt")
            tune.report({METRIC: entry["val_macro_f1"], "epoch": entry["epoch"], "train_loss": entry["train_loss"],
                         "lr": entry["lr"]}, checkpoint=tune.Checkpoint.from_directory(folder))

    result = train(packs, out_dir, cfg, device=device, progress=False, limit=limit, on_epoch=report)
    # A checkpoint handed over with every epoch run leaves nothing to train: report its last
    # epoch, or the trial would end without a result (run_search's stop rule then ends it).
    if not reported and result["history"]:
        report(result["history"][-1], out_dir / "checkpoint.pt")


def run_search(packs: list[str | os.PathLike], out: str | os.PathLike, base: LearnerTrainConfig, *,
               scheduler: str = "asha", samples: int = 8, limit: int | None = None, grace: int = 1,
               perturbation_interval: int = 1, quantile: float = 0.25, cpus: int | None = None,
               cpus_per_trial: int = 1,
               address: str | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """Run a search; returns (and writes to ``out/results.json``) every trial's sampled values
    with its best and last validation macro-F1. ``base.split_file`` should be set so that all
    trials (and later runs) share one patient split."""
    ray, tune = _require_ray()
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = search_space(base.epochs)
    if scheduler == "asha":
        chosen = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs, grace_period=grace,
                               reduction_factor=2)
    elif scheduler == "pbt":
        chosen = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=perturbation_interval,
                                         hyperparam_mutations={k: space[k] for k in MUTATED},
                                         quantile_fraction=quantile, custom_explore_fn=clip_to_bounds,
                                         synch=True)  # every trial reaches the exploit point: reproducible
    else:
        raise ValueError(f"scheduler must be 'asha' or 'pbt', not {scheduler!r}")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a new one-machine Ray (never a cluster that happens to run here): no dashboard, a small
            # object store (trials share data through files)
            ray.init(address="local", num_cpus=cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 1024**2)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, packs=[str(Path(p).resolve()) for p in packs],
                             base=base, limit=limit,
                             device=device),
        {"cpu": cpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=chosen, num_samples=samples,
                                    search_alg=BasicVariantGenerator(random_state=seed)),
        # Stopped at its last epoch by Tune itself, a trial is never exploited after it: PBT would hand
        # it a checkpoint with nothing left to train.
        run_config=tune.RunConfig(name=f"{scheduler}", storage_path=str(out / "ray"), stop={"epoch": base.epochs},
                                  # PBT clones other trials' checkpoints: keep them all there
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=None if scheduler == "pbt" else 1), verbose=0))
    grid = tuner.fit()
    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        scores = [] if frame is None or METRIC not in frame else frame[METRIC].tolist()
        trials.append({"config": {k: result.config[k] for k in SEARCHED},
                       "best_val_macro_f1": max(scores) if scores else None,
                       "last_val_macro_f1": scores[-1] if scores else None, "epochs": len(scores),
                       "error": None if result.error is None else str(result.error).splitlines()[0]})
    trials.sort(key=lambda t: -1 if t["best_val_macro_f1"] is None else -t["best_val_macro_f1"])
    summary = {"scheduler": scheduler, "samples": samples, "limit": limit, "seed": seed,
               "base": {k: v for k, v in asdict(base).items() if k not in SEARCHED}, "trials": trials,
               "exploits": _exploits(out / "ray" / scheduler / "pbt_global.txt")}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "results.md").write_text(results_table(summary))
    return summary


def _exploits(log_path: Path) -> list[dict]:
    """PBT's log of exploits: which trial continued from which, after which epoch, with what values."""
    if not log_path.is_file():
        return []
    out = []
    for line in log_path.read_text().splitlines():
        target, source, _, source_step, _, new = json.loads(line)
        out.append({"trial": target.split("_")[0], "cloned": source.split("_")[0], "after_epoch": source_step,
                    "config": {k: new[k] for k in SEARCHED}})
    return out


def results_table(summary: dict) -> str:
    """A Markdown table of the trials, best first."""
    head = ("| rank | optimizer | lr | step size | gamma | momentum | weight decay | patches/image | epochs "
            "| best val macro-F1 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for rank, t in enumerate(summary["trials"], 1):
        c = t["config"]
        best = "failed" if t["best_val_macro_f1"] is None else f"{t['best_val_macro_f1']:.3f}"
        rows.append(f"| {rank} | {c['optimizer']} | {c['lr']:.2e} | {c['step_size']} | {c['gamma']:.2f} "
                    f"| {c['momentum']:.2f} | {c['weight_decay']:.1e} | {c['patches_per_image']} | {t['epochs']} "
                    f"| {best} |")
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchflannel.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packs", nargs="+", required=True, help="Stage 1 HDF5 packs with label/patient_id/source")
    p.add_argument("--out", type=Path, required=True, help="results.json, results.md and Ray's trial folders")
    p.add_argument("--learner", default="efficientnet_lite0",
                   help="backbone; its lite-preset recipe (weights, frozen fraction) is the fixed base")
    p.add_argument("--weights", default=None, help="override the recipe's weights ('imagenet', a file, 'none')")
    p.add_argument("--split", default=None, help="patient_id,split CSV shared by every trial (default: drawn "
                   "once, seeded, and written to OUT/split.csv)")
    p.add_argument("--scheduler", choices=("asha", "pbt"), default="asha")
    p.add_argument("--samples", type=int, default=8, help="trials (the population size for pbt)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per trial at most")
    p.add_argument("--grace", type=int, default=1, help="asha: epochs before a trial can be stopped")
    p.add_argument("--perturbation-interval", type=int, default=1, help="pbt: epochs between exploits")
    p.add_argument("--quantile", type=float, default=0.25,
                   help="pbt: the fraction of trials that exploit (and that are exploited); 0.5 for tiny populations")
    p.add_argument("--limit", type=int, default=None, help="training images per trial (a small search)")
    p.add_argument("--val-k", type=int, default=4, help="patches per validation image")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of a one-machine Ray (default: all)")
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--address", default=None, help="a running Ray cluster ('auto', 'ray://host:10001')")
    p.add_argument("--device", default="auto", help="each trial's device (auto: cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    overrides = {"epochs": args.epochs, "val_k": args.val_k, "patch_size": args.patch_size, "seed": args.seed}
    if args.weights is not None:
        overrides["weights"] = None if args.weights == "none" else args.weights
    base = recipe_config(args.learner, **overrides)
    split = args.split
    if split is None:  # one split for every trial, drawn the way the trainer draws it
        from .evaluation.splits import write_split
        from .learners.data import read_rows
        from .learners.data import make_split
        rows = read_rows(args.packs)
        args.out.mkdir(parents=True, exist_ok=True)
        split = str((args.out / "split.csv").resolve())
        write_split(make_split(rows, base), split)
    base.split_file = str(Path(split).resolve())
    summary = run_search(args.packs, args.out, base, scheduler=args.scheduler, samples=args.samples,
                         limit=args.limit, grace=args.grace, perturbation_interval=args.perturbation_interval,
                         quantile=args.quantile,
                         cpus=args.cpus, cpus_per_trial=args.cpus_per_trial, address=args.address, seed=args.seed,
                         device=args.device)
    print(results_table(summary))


if __name__ == "__main__":
    sys.exit(run_command(main))
