"""``python -m patchflannel``: the ``patchflannel`` command (see :mod:`patchflannel.cli`)."""
import sys

from .cli import main

sys.exit(main())
