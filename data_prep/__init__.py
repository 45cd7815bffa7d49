"""Public chest X-ray datasets, in their published folder layouts -> the project's manifest CSV.

Each script runs as ``python -m data_prep.<name> ROOT --out MANIFEST.csv`` and prints a JSON
summary (rows written, rows dropped by reason, rows per label):

* :mod:`data_prep.cohen` - Cohen et al.'s covid-chestxray-dataset (``metadata.csv`` + ``images/``);
* :mod:`data_prep.kermany` - Kermany et al.'s pediatric pneumonia set (``chest_xray/``);
* :mod:`data_prep.radiography` - the Kaggle COVID-19 Radiography Database (no patient ids).

The manifest has the columns of ``cxr4/manifest.csv``
(``image,label,patient_id,source,view,orig_width,orig_height``), image paths relative to its
folder, and is read with :func:`patchflannel.manifest.read_manifest`.
"""
