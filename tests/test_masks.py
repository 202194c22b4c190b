"""data.masks: the fine quality mask a user's qc maps imply."""

from __future__ import annotations

import numpy as np


def test_fine_mask_estimate_inverts_the_qc_model():
    """64x64 SNR of 0 (hole) or 5 per acquired voxel: the estimate is the fine quality mask exactly.

    (Footprints overlap their neighbours by half a pixel, so acquired SNRs mix at borders; 0 and 5 stay
    on their side of the 2.5 threshold at every s.) The ``lr`` support threshold, on the acquired
    voxel's own SNR, keeps the holes."""
    from ftddm_trt.data.masks import fine_mask_estimate, lr_qc_maps, quality_mask_from_qc, upsample_nearest

    rng = np.random.default_rng(3)
    for n in (8, 16, 32):
        amp = np.where(rng.random((n, n)) < 0.7, 5.0, 0.0)
        amp[[0, -1], :] = amp[:, [0, -1]] = 0.0  # edge voxels wrap in the area average; keep them empty
        for fwhm in (0.1, 0.2):
            snr64, fwhm64 = upsample_nearest(amp), np.full((64, 64), fwhm)
            snr_lr, fwhm_lr = lr_qc_maps((snr64, fwhm64), n)
            est = fine_mask_estimate(snr_lr, fwhm_lr)
            assert est.shape == (64, 64) and est.dtype == bool
            np.testing.assert_array_equal(est, quality_mask_from_qc(snr64, fwhm64))
            assert est.any() == (fwhm < 0.15)
        support = upsample_nearest(quality_mask_from_qc(snr_lr, np.full((n, n), 0.1)))
        est = fine_mask_estimate(snr_lr, np.full((n, n), 0.1))
        assert (support & ~est).any() and not (est & ~support).any()
