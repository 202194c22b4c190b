"""Console entry point: imports every command module so that it registers on `app`."""

from ftddm_trt.cli.app import app
from ftddm_trt.cli import bench as _bench  # noqa: F401
from ftddm_trt.cli import cohort as _cohort  # noqa: F401
from ftddm_trt.cli import demo as _demo  # noqa: F401
from ftddm_trt.cli import export as _export  # noqa: F401
from ftddm_trt.cli import phantom as _phantom  # noqa: F401
from ftddm_trt.cli import train as _train  # noqa: F401
from ftddm_trt.cli import upscale as _upscale  # noqa: F401
from ftddm_trt.cli import serving as _serving  # noqa: F401

__all__ = ["app"]

if __name__ == "__main__":
    app()
