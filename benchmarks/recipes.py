"""The recipe ablation: a thin driver over :mod:`patchflannel.ablation`; see
``python -m patchflannel.ablation --help``.

    python benchmarks/recipes.py --packs runs/masked/cxr4.h5 runs/masked/adult.h5 --out runs/recipes
"""
from patchflannel.ablation import main

if __name__ == "__main__":
    main()
