"""``python -m patchflannel.segment INPUT --out DIR``: the Stage 1 batch job.

INPUT is a folder (searched recursively for PNG/JPEG/TIFF/BMP/DICOM) or a manifest CSV
(paths in ``--path-column``, relative to the CSV; other columns are carried into the
HDF5 pack). Writes one masked ``.npz`` per image, ``summary.jsonl``/``summary.csv`` with
every input's status, and optionally an HDF5 pack. Rerunning resumes. Exit codes
(shared with ``patchflannel.predict``): 0 something was done (or everything was already done),
1 nothing could be done (no images, or none succeeded), 2 a usage error (bad path, manifest or option).

Sharded (array jobs, several machines, or ``torchrun --nproc-per-node N ... --shard auto``):
run ``--shard i/n`` for i = 0..n-1 into the same ``--out``, then ``--merge`` once (with
``--h5`` for the pack); the result is that of one unsharded job.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..runtime import BACKEND_HELP, BACKENDS
from ..errors import EXIT_NOTHING_DONE, EXIT_USAGE, PatchflannelError, run_command
from ..jobs.shard import Shard
from ..store import PackWriteError
from ..jobs.shell import exit_status, job_inputs
from .job import merge_shards, run_batch
from .segmenter import Segmenter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchflannel.segment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="folder of images or manifest .csv")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--weights", type=Path, default=None, help="segmenter bundle folder (default: shipped FC-DenseNet)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="threads that decode and write beside the network")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help=BACKEND_HELP)
    p.add_argument("--working-size", type=int, default=1024, help="side of the stored square image")
    p.add_argument("--path-column", default="image", help="manifest column holding image paths")
    p.add_argument("--keep-unmasked", action="store_true", help="also store the unmasked image")
    p.add_argument("--h5", type=Path, default=None, help="also pack all outputs into this HDF5 file")
    p.add_argument("--retry-failed", action="store_true", help="retry inputs recorded as rejected or error")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs")
    p.add_argument("--no-amp", action="store_true", help="run the network in float32")
    p.add_argument("--shard", default=None,
                   help="i/n: only shard i (from 0) of n, logged apart (auto: from torchrun/SLURM variables)")
    p.add_argument("--merge", action="store_true", help="combine the shards' summaries (and --h5) and exit")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.merge:
            counts = merge_shards(args.input, args.out, path_column=args.path_column, h5_path=args.h5)
            print(json.dumps(counts))
            return 0 if not counts["missing"] else 1
        shard = Shard.parse(args.shard)
        if shard is not None and args.h5:
            p.error("--h5 is written by --merge once every shard has finished")
        # Inputs and the output folder are checked before the model loads.
        out_dir, items = job_inputs(args.input, args.out, args.path_column)
        if not items:
            print(f"error: {args.input}: no images found", file=sys.stderr)
            return exit_status({"total": 0, "ok": 0})
        segmenter = Segmenter.from_bundle(args.weights, device=args.device, amp=not args.no_amp, backend=args.backend,
                                          working_size=args.working_size, batch_size=args.batch_size)
        counts = run_batch(args.input, out_dir, segmenter, batch_size=args.batch_size, workers=args.workers,
                           path_column=args.path_column, keep_unmasked=args.keep_unmasked,
                           retry_failed=args.retry_failed, h5_path=args.h5, progress=not args.no_progress,
                           limit=args.limit, shard=shard, items=items)
    except PackWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    except (PatchflannelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk or a folder that turned read-only mid-run
        print(f"error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    print(json.dumps(counts))
    return exit_status(counts)


if __name__ == "__main__":
    sys.exit(run_command(main))
