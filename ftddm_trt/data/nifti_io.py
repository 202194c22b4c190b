"""The names of ``data.nifti.read`` under their former module path, for importers not yet pointed at it."""

from __future__ import annotations

from ftddm_trt.data.nifti.read import *  # noqa: F401,F403
from ftddm_trt.data.nifti.read import (  # noqa: F401
    __all__,
    _find_file,
    _linear_onto,
    _load,
    _match_metabolites,
    _nifti_files,
    _same_grid,
)
