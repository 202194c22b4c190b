"""Console entry point: imports every command module so that it registers on `app`, and turns
SIGINT / SIGTERM into a clean stop (one line on stderr, exit 128 + signal, nothing partial left:
every output is staged by ``ftddm_trt.atomic`` and its staging folder is removed on the way out)."""

from __future__ import annotations

import signal
import sys

# isort: off
# the commands register in import order, which is their order in `ftddm-trt --help` (panels: Use, Train, Deploy,
# Measure)
from ftddm_trt.cli.app import app
from ftddm_trt.cli import upscale as _upscale  # noqa: F401
from ftddm_trt.cli import cohort as _cohort  # noqa: F401
from ftddm_trt.cli import evaluate as _evaluate  # noqa: F401
from ftddm_trt.cli import demo as _demo  # noqa: F401
from ftddm_trt.cli import phantom as _phantom  # noqa: F401
from ftddm_trt.cli import train as _train  # noqa: F401
from ftddm_trt.cli import export as _export  # noqa: F401
from ftddm_trt.cli import serving as _serving  # noqa: F401
from ftddm_trt.cli import bench as _bench  # noqa: F401
# isort: on

__all__ = ["app", "main", "Interrupted"]


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT / SIGTERM (a BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    # a second signal while cleaning up is ignored: the cleanup must finish
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; SIGINT / SIGTERM stop it cleanly with a one-line message."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _raise_interrupted)
    try:
        app(args=argv, prog_name="ftddm-trt")
    except Interrupted as err:
        name = signal.Signals(err.signum).name
        print(f"ftddm-trt: stopped by {name}; nothing partial was left (outputs appear only when complete)",
              file=sys.stderr)
        sys.exit(128 + err.signum)


if __name__ == "__main__":
    main()
