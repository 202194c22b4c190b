"""Deterministic synthetic glioma MRSI phantoms (``data.phantom_anatomy`` holds the generator)."""

from ftddm_trt.data.phantom_anatomy import *  # noqa: F401,F403
from ftddm_trt.data.phantom_anatomy import __all__  # noqa: F401
