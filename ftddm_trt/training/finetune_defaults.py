"""Defaults of ``ftddm-trt finetune``, in one torch-free module.

``training.finetune.FinetuneConfig`` and the option declarations of ``ftddm-trt finetune`` both read
them from here (the CLI imports the training code only when the command runs), so ``--help`` and the
config never disagree.
"""

from __future__ import annotations

from ftddm_trt import constants

#: Training time budget (minutes), shared between the networks.
MINUTES: float = 10.0
#: The truncated UNet alone by default: on held-out subjects of an unseen style (benchmarks/finetune_unseen.py)
#: a fine-tuned UNet with the base flow gained over the base model, a fine-tuned flow lost (it over-fits
#: the few site subjects in the 10-minute budget); docs/fine-tuning.md.
NETWORKS: tuple[str, ...] = ("unet",)
#: Adam learning rate (constant).
LR: float = 1e-4
#: Fraction of training maps given the ``lr`` mask protocol (the N x N qc mask a user has).
LR_FRACTION: float = 0.75
#: Loss weight of the voxels of M outside the truth's quality mask (``constants.MARGIN_WEIGHT``).
MARGIN_WEIGHT: float = constants.MARGIN_WEIGHT
#: Subjects held out for validation (the last ones by name).
VAL_SUBJECTS: int = 2
#: Share of the budget that fine-tunes the base's fine-mask estimator (``models.fine_mask``) on the site's
#: quality masks, after the networks (which get the rest); 0 or a base without one: not fine-tuned.
FINE_MASK_SHARE: float = 0.1
#: qc convention of the site's N x N acquisitions for the validation of the qc step (``data.qc_conventions``);
#: ``any`` averages over all of them.
QC_CONVENTION: str = "any"
