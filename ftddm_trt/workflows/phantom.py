"""Write synthetic glioma MRSI subjects in the FSL-MRS layout: the logic behind `ftddm-trt phantom`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ftddm_trt.atomic import atomic_dir
from ftddm_trt.constants import HR_SIZE, TRAINED_LR_SIZES
from ftddm_trt.workflows.console import console

__all__ = ["n_for_scale", "write_phantoms"]


def n_for_scale(scale: float) -> int:
    """Acquired size for an upscaling factor: ``N = round(64 / s)`` rounded to the nearest even number."""
    if not 2.0 <= scale <= 8.0:
        raise ValueError(f"scale must be in [2, 8], got {scale}")
    n = int(2 * round(HR_SIZE / scale / 2))
    return min(max(n, TRAINED_LR_SIZES[0]), TRAINED_LR_SIZES[-1])


def write_phantoms(
    out_dir: Path,
    subjects: int,
    seed: int,
    size: int,
    convention,
    styles: Sequence[str] = ("classic",),
    family: str = "tissue",
    first: int = 0,
    hr_masks: bool = False,
    training: bool = False,
    force: bool = False,
) -> dict:
    """Write subjects ``first .. first + subjects - 1`` into ``out_dir`` at once (no stale subject of an
    earlier run survives) with ``phantoms.json``; returns that manifest.

    ``size``: the acquired N (ignored with ``training``: 64 x 64 training subjects); ``convention``: the
    qc convention (``data.qc_conventions.get_convention``); ``styles`` are taken in turn by the subjects of
    the ``tissue`` family. OutputError when ``out_dir`` is refused."""
    from ftddm_trt.data.field_phantom import make_field_subject
    from ftddm_trt.data.nifti.write import write_phantom_subject, write_training_subject
    from ftddm_trt.data.phantom import make_subject
    from ftddm_trt.data.qc_conventions import with_site_thresholds

    with atomic_dir(out_dir, force, command="phantom") as tmp:
        ids = []
        with Progress(
            TextColumn("[bold]phantoms[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        ) as progress:
            task = progress.add_task("phantoms", total=subjects)
            for k, i in enumerate(range(first, first + subjects)):
                if family == "fields":
                    sub = make_field_subject(i, seed)
                else:
                    sub = make_subject(i, seed, style=styles[k % len(styles)])
                sub = with_site_thresholds(sub, convention)
                if training:
                    write_training_subject(tmp, sub)
                else:
                    write_phantom_subject(tmp, sub, size, hr_masks=hr_masks, convention=convention)
                ids.append(sub.subject_id)
                progress.advance(task)
        manifest = {"seed": seed, "n": HR_SIZE if training else size, "scale": 1.0 if training else HR_SIZE / size,
                    "hr_masks": hr_masks, "family": family, "styles": list(styles) if family == "tissue" else [],
                    "qc_convention": convention.name, "layout": "training" if training else "input+truth",
                    "subjects": ids}
        (tmp / "phantoms.json").write_text(json.dumps(manifest, indent=2))
    return manifest
