"""The five-fold cross-validation benchmark: a thin driver over :mod:`patchflannel.cv`
(the same as ``patchflannel cv``); see ``python -m patchflannel.cv --help``.

    python benchmarks/cross_validation.py --packs runs/masked/cxr4.h5 runs/masked/adult.h5 \
        --image-roots ../shared/data/cxr4 ../shared/data/adult --out runs/cv
"""
from patchflannel.cv import main

if __name__ == "__main__":
    main()
