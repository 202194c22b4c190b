"""The qc of a combined metabolite (``Cr+PCr``, ``GPC+PCh``, ``NAA+NAAG``) from its parts' qc maps.

``fsl_mrsi --combine`` sums the parts' concentrations but writes qc maps only for the parts. The
combination's SNR and FWHM are derived per voxel, in the form the parts have, so that the quality
mask is made from them exactly as from any other metabolite's qc:

- SNR: the sum of the parts' SNR. FSL-MRS's SNR of a spectrum is its fitted peak height over the
  noise of the one spectrum all parts are fitted to; the peaks of a sum add over that same noise
  (exact for co-resonant parts such as the Cr and PCr methyl singlets, an upper bound for parts
  whose peaks do not overlap).
- FWHM: the largest of the parts' FWHM (the sum's peak is at least as broad as its broadest part).

A voxel where no part is fitted (SNR 0) stays at SNR 0, so the sum fails there as its parts do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import NDArray


def combine_snr(parts: Sequence[NDArray]) -> NDArray[np.float32]:
    """SNR of a sum of spectra: the sum of the parts' SNR maps (one part: itself)."""
    return np.sum(np.stack([np.asarray(p, dtype=np.float32) for p in parts]), axis=0)


def combine_fwhm(parts: Sequence[NDArray]) -> NDArray[np.float32]:
    """FWHM (ppm) of a sum of spectra: the largest of the parts' FWHM maps (one part: itself)."""
    return np.max(np.stack([np.asarray(p, dtype=np.float32) for p in parts]), axis=0)
