"""A picture of every augmentation set on real lung patches, to check by eye that they look
like chest X-ray patches (PNG; columns: the patch, then each set; rows: films).

    python benchmarks/augmentation_gallery.py --pack runs/masked/cxr4.h5 --out benchmarks/results/recipes/augmentations.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from patchflannel.training.augment import Augmentation
from patchflannel.learners.data import load_masked_set, read_rows
from patchflannel.learners.data import draw_patches
from patchflannel.viz import contact_sheet

SETS = ["none", "standard", "strong", "standard+rot15", "standard+elastic", "standard+blur", "standard+randomcrop",
        "standard+flip"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--films", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = read_rows([args.pack])
    picked = [rows[i] for i in np.random.default_rng(args.seed).choice(len(rows), args.films, replace=False)]
    films = load_masked_set(picked, progress=False)
    generator = torch.Generator().manual_seed(args.seed)
    patches = draw_patches(films, torch.arange(len(films)), 1, 224, generator, 1000)
    columns = [patches] + [Augmentation.parse(s)(patches, torch.Generator().manual_seed(args.seed), keep_zero=True)
                           for s in SETS]
    tiles = []
    for film in range(len(films)):
        for column in columns:
            grey = (column[film, 0].numpy() * 255).round().astype(np.uint8)
            tiles.append(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    sheet = contact_sheet(tiles, columns=len(columns), tile_size=160)
    header = np.full((28, sheet.shape[1], 3), 255, np.uint8)
    for i, name in enumerate(["patch", *SETS]):
        cv2.putText(header, name.replace("standard+", "+"), (i * 160 + 4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), np.vstack([header, sheet]))
    print(args.out)


if __name__ == "__main__":
    main()
