"""Degraded inputs: refused by default with the reason named, each accepted only when asked for.

``check_subject`` looks at a subject read by ``data.nifti.read.read_subject`` and raises ``InputError`` for
each degradation the user did not accept:

- ``missing-anatomy``: ``t1.nii.gz`` or ``flair.nii.gz`` absent. Accepted (``--allow-missing-anatomy``),
  the fallback is the one ``engine.upscale.build_condition`` applies: the missing image's condition
  channel is all zeros (the network then has less anatomical guidance; expect lower quality).
- ``partial-anatomy``: T1 or FLAIR covers less than ``ANATOMY_COVERAGE_MIN`` of the voxels with signal
  (``SubjectInput.anatomy_coverage``, measured after resampling onto the 64x64 grid). Accepted: the
  uncovered voxels' anatomy channel is zero there (lower quality there).
- ``zero-maps``: a metabolite map that is zero everywhere. Accepted: its output is zero.
- ``out-of-range``: values below ``MIN_VALUE`` (no concentration is that negative; a sign or unit
  error). Accepted: run as given (outputs are clipped at zero as always).
- NaN or inf in a map is never accepted (``read_subject`` already refuses it, naming the file).
- ``empty-mask``: the mask M of a metabolite is empty on every slice (an explicit mask file that is
  empty, or a map with no signal): there is nothing to super-resolve. Accepted: its output is zero.
  Maps already named as zero or out of range are not named again.
- ``below-breakpoint``: maps acquired below the model's measured breakpoint (checked by
  ``data.breakpoint.check_acquired_size``, which knows the model). Accepted: run anyway.

Notes that need no acceptance (recorded, printed): anisotropic in-plane voxels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ftddm_trt.data.nifti.files import InputError, match_metabolites, nifti_files
from ftddm_trt.data.nifti.read import CONC_KINDS, SubjectInput

#: Reasons a user can accept (``--accept``; ``missing-anatomy`` also as ``--allow-missing-anatomy``).
ACCEPTABLE: tuple[str, ...] = ("missing-anatomy", "partial-anatomy", "zero-maps", "out-of-range", "empty-mask",
                               "below-breakpoint")
#: Least share of the voxels with signal that T1 and FLAIR must each cover (else ``partial-anatomy``).
ANATOMY_COVERAGE_MIN: float = 0.9
#: Most negative value taken as a concentration (file units); below it a map is out of range.
MIN_VALUE: float = -1e3
#: Relative difference of the two in-plane voxel sizes above which a note is made.
ANISOTROPY_TOL: float = 0.01


def kinds_present(subject_dir: Path) -> list[str]:
    """The concentration kinds (``CONC_KINDS``) under ``subject_dir/concs`` that hold metabolite maps."""
    return [k for k in CONC_KINDS if match_metabolites(nifti_files(Path(subject_dir) / "concs" / k))[0]]


def kinds_to_read(subject_dir: Path, kind: str | None) -> list[str]:
    """The concentration kinds to super-resolve: ``kind`` alone when given (InputError if it is not one of
    ``CONC_KINDS``), else every kind present (fsl_mrsi writes raw and internal by default)."""
    if kind is not None:
        if kind not in CONC_KINDS:
            raise InputError(
                Path(subject_dir) / "concs", f"--kind must be one of {', '.join(CONC_KINDS)}, got {kind!r}"
            )
        return [kind]
    return kinds_present(subject_dir) or [CONC_KINDS[0]]


def zero_output_channels(subject: SubjectInput) -> np.ndarray:
    """(M,) bool: metabolites whose output is defined as zero (map zero everywhere or mask empty)."""
    zero = ~(subject.lr != 0).any(axis=(0, 2, 3))
    if subject.mask is not None:
        zero |= ~subject.mask.any(axis=(0, 2, 3))
    return zero


def refuse_unless_accepted(root: Path, reason: str, accept: set[str] | frozenset[str], problem: str, fallback: str,
                           option: str | None = None) -> str:
    """InputError naming ``problem`` and the option that accepts it (``option``, else ``--accept reason``) unless
    ``reason`` is in ``accept``; then the line run.json records (``reason: problem; fallback``)."""
    if reason not in accept:
        raise InputError(root, f"{problem}; refused (pass {option or '--accept ' + reason} to run anyway: {fallback})")
    return f"{reason}: {problem}; {fallback}"


def _names(subject: SubjectInput, idx: np.ndarray) -> str:
    return ", ".join(subject.metabolites[i] for i in idx)


def check_subject(
    subject: SubjectInput, accept: set[str] | frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """Refuse (InputError naming the reason and the option that accepts it) or accept each degradation.

    Returns ``(accepted, notes)``: what was accepted, as sentences, and remarks needing no acceptance.
    """
    unknown = set(accept) - set(ACCEPTABLE)
    if unknown:
        raise ValueError(f"unknown --accept value(s) {', '.join(sorted(unknown))}; choose from {', '.join(ACCEPTABLE)}")
    accepted: list[str] = []
    notes: list[str] = []
    root = subject.path

    def degrade(reason: str, problem: str, fallback: str, option: str | None = None) -> None:
        accepted.append(refuse_unless_accepted(root, reason, accept, problem, fallback, option))

    lr = subject.lr
    finite = np.isfinite(lr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=(0, 2, 3)))
        raise InputError(root, f"NaN or inf values in the maps of {_names(subject, bad)}; refused")
    low = np.flatnonzero((lr < MIN_VALUE).any(axis=(0, 2, 3)))
    if low.size:
        degrade("out-of-range", f"values below {MIN_VALUE:g} in {_names(subject, low)} (min {lr.min():.3g}; "
                "no concentration is that negative: a sign or unit error?)", "the maps are used as given")
    zero = np.flatnonzero(~(lr != 0).any(axis=(0, 2, 3)))
    if zero.size:
        degrade("zero-maps", f"the maps of {_names(subject, zero)} are zero everywhere", "their output is zero")
    if subject.mask is not None:
        named = set(low.tolist()) | set(zero.tolist())  # their problem is named already
        empty = np.array([c for c in np.flatnonzero(~subject.mask.any(axis=(0, 2, 3))) if c not in named], dtype=int)
        if empty.size:
            why = "the mask files are empty" if subject.mask_source in ("masks", "mask") else "the map has no signal"
            degrade("empty-mask", f"the quality mask of {_names(subject, empty)} is empty on every slice (mask from "
                    f"{subject.mask_source}: {why})", "their output is zero")
    missing = [n for n, v in (("t1", subject.t1), ("flair", subject.flair)) if v is None]
    if missing:
        degrade("missing-anatomy", f"no {' or '.join(m + '.nii.gz' for m in missing)} in {root} (the model is "
                "conditioned on T1 and FLAIR)", f"the {' and '.join(missing)} channel is zeros, quality may drop "
                "below zero-filled", option="--allow-missing-anatomy")
    partial = {n: c for n, c in subject.anatomy_coverage.items() if c < ANATOMY_COVERAGE_MIN}
    if partial:
        what = " and ".join(f"{n} covers {100 * c:.0f}%" for n, c in partial.items())
        degrade("partial-anatomy", f"{what} of the MRSI voxels with signal (at least {100 * ANATOMY_COVERAGE_MIN:.0f}% "
                "needed)", "the anatomy channels are zero where the images do not reach, quality drops there")
    vx = np.linalg.norm(np.asarray(subject.affine_lr)[:3, :2], axis=0)
    if abs(vx[0] - vx[1]) > ANISOTROPY_TOL * max(vx):
        notes.append(f"anisotropic in-plane voxels ({vx[0]:.3g} x {vx[1]:.3g} mm): the model was trained on square "
                     "voxels; the output keeps the input's geometry")
    return accepted, notes
