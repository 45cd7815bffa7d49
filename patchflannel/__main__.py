"""``python -m patchflannel``: the ``patchflannel`` command (see `patchflannel.cli`)."""
import sys

from .cli import main

sys.exit(main())
