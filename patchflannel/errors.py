"""The library's exceptions: one small hierarchy, each naming the file and the reason."""
from __future__ import annotations

import os

__all__ = ["EXIT_NOTHING_DONE", "EXIT_OK", "EXIT_USAGE", "DataNotFoundError", "InvalidImageError", "PatchflannelError",
           "WeightsError", "run_command"]


class PatchflannelError(Exception):
    """Base class of every error this library raises on purpose.

    Attributes:
        exit_code: what a command exits with when this error ends it (see :func:`run_command`).
    """

    exit_code = 2  # a usage error: a bad path, file, bundle or option


class InvalidImageError(PatchflannelError, ValueError):
    """An input that cannot be used as a chest X-ray image (unreadable, empty, too small, ...).

    Attributes:
        path: the file (or a description of the array) that was refused.
        reason: why, in words.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path or '<array>'}: {reason}")


class WeightsError(PatchflannelError):
    """Weights or a model bundle that are missing, incomplete or do not match their config."""


class DataNotFoundError(PatchflannelError, FileNotFoundError):
    """A data folder or manifest the caller pointed to does not exist."""


#: The exit codes of every command: something was done, nothing could be done, a usage error.
EXIT_OK, EXIT_NOTHING_DONE, EXIT_USAGE = 0, 1, 2


def run_command(main, argv=None) -> int:
    """Run a command's ``main(argv)`` and turn its outcome into the shared exit code: its own
    code (``None`` or a result dict: 0), 2 for a usage error (argparse's, or an error of this
    library, printed as one line), 1 for a failure of the system (a full disk, a folder that
    turned read-only; an error's own ``exit_code``). Any other exception is a bug: it keeps its
    traceback (exit 1)."""
    import sys

    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's usage errors (2), --help (0), explicit exits
        code = exc.code
        if isinstance(code, int):
            return code
        if code is not None:
            print(code, file=sys.stderr)
        return EXIT_OK if code is None else EXIT_NOTHING_DONE
    except PatchflannelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    return EXIT_OK if status is None or isinstance(status, dict) else int(status)
