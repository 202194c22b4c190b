"""Console entry point: imports every command module so that it registers on `app`."""

from ftddm_trt.cli.app import app
from ftddm_trt.cli import phantom as _phantom  # noqa: F401

__all__ = ["app"]

if __name__ == "__main__":
    app()
