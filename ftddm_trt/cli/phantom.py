"""``ftddm-trt phantom``: write synthetic glioma MRSI subjects in the FSL-MRS layout (``workflows.phantom``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.atomic import OutputError
from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import EXPERT, spellings
from ftddm_trt.cli.common import console
from ftddm_trt.constants import HR_SIZE, LR_SIZES
from ftddm_trt.workflows.phantom import n_for_scale, write_phantoms

__all__ = ["phantom"]


@app.command("phantom", cls=spellings(positionals=("--out",)), rich_help_panel="Use")
def phantom(
    out: Path = typer.Option(..., "--out", help="Output folder (one sub-folder per subject)."),
    subjects: int = typer.Option(25, "--subjects", min=1, help="Number of subjects."),
    seed: int = typer.Option(0, "--seed", help="Dataset seed (same seed, same phantoms)."),
    scale: Optional[float] = typer.Option(
        None,
        "--scale",
        help="Upscaling factor s in [2, 8]; the acquired size is N = round(64 / s) made even.",
        show_default="4",
    ),
    n: Optional[int] = typer.Option(
        None, "--n", help=f"Acquired in-plane size N instead of --scale, one of {list(LR_SIZES)}.",
        show_default="from --scale",
    ),
    hr_masks: bool = typer.Option(
        False, "--hr-masks", help="Also give the 64x64 quality masks as input (masks/), the paper's protocol.",
        show_default="off",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace a non-empty --out folder written by ftddm-trt (all of it: no stale subjects "
        "remain).", show_default="off",
    ),
    style: list[str] = typer.Option(
        ["classic"],
        "--style",
        help="Phantom style (repeatable; subjects take them in turn): classic, ribbon, smooth, patchy.",
    ),
    training: bool = typer.Option(
        False,
        "--training",
        help="Write high-resolution training subjects (64 x 64 maps and qc, T1, FLAIR) for `ftddm-trt finetune`, "
             "instead of N x N inputs with truth.",
        show_default="off",
    ),
    first: int = typer.Option(
        0, "--first", min=0, help="Index of the first subject (sub-<first>, ...): draw disjoint sets with one seed.",
        **EXPERT,
    ),
    family: str = typer.Option(
        "tissue",
        "--family",
        help="Metabolite generator: tissue (tissue fractions, the --style options) or fields (random fields and "
             "textures, never used in training the shipped model).",
        **EXPERT,
    ),
    qc_convention: str = typer.Option(
        "ours",
        "--qc-convention",
        help="How the N x N qc maps are written: ours, mean-k0, mean-k2, sample, min, hz-3t, sample-hz-7t, "
             "strict-thresholds, missing (docs: qc conventions).",
    ),
) -> None:
    """Generate phantom subjects: N x N maps + qc, T1, FLAIR as input, 64x64 truth in <subject>/truth/."""
    from ftddm_trt.data.phantom_styles import get_style
    from ftddm_trt.data.qc_conventions import get_convention

    if family not in ("tissue", "fields"):
        raise typer.BadParameter(f"{family!r} is not one of tissue, fields", param_hint="--family")
    try:
        convention = get_convention(qc_convention)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--qc-convention") from exc

    for name in style:
        try:
            get_style(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--style") from exc

    if scale is not None and n is not None:
        raise typer.BadParameter("give --scale or --n, not both", param_hint="--scale/--n")
    if n is not None:
        if n not in LR_SIZES:
            raise typer.BadParameter(f"{n} is not one of {list(LR_SIZES)}", param_hint="--n")
        size = n
    else:
        try:
            size = n_for_scale(4.0 if scale is None else scale)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--scale") from exc

    try:
        write_phantoms(out, subjects, seed, size, convention, styles=style, family=family, first=first,
                       hr_masks=hr_masks, training=training, force=force)
    except OutputError as err:
        raise typer.BadParameter(str(err), param_hint="--out") from err
    what = "64 x 64 training subjects" if training else f"subjects (N={size}, s={HR_SIZE / size:.2f})"
    made = f"styles {', '.join(style)}" if family == "tissue" else "fields family"
    console.print(f"wrote {subjects} {what} to {out} ({made}, qc {convention.name}, seed={seed})")
