"""The public names of ``data.nifti`` under their former module path, for importers not yet pointed at it.

Import from ``data.nifti.read``, ``data.nifti.write``, ``data.nifti.resample`` or ``data.nifti.files``.
"""

from __future__ import annotations

from ftddm_trt.data.nifti.files import InputError
from ftddm_trt.data.nifti.read import CONC_KINDS, METABOLITE_ALIASES, SubjectInput, read_map_folder, read_subject
from ftddm_trt.data.nifti.resample import lr_affine_for, sr_affine
from ftddm_trt.data.nifti.write import write_maps, write_phantom_subject, write_subject, write_training_subject

__all__ = [
    "InputError",
    "SubjectInput",
    "CONC_KINDS",
    "METABOLITE_ALIASES",
    "sr_affine",
    "lr_affine_for",
    "write_subject",
    "write_maps",
    "write_phantom_subject",
    "write_training_subject",
    "read_subject",
    "read_map_folder",
]
