"""The report picture of an upscaled volume (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from ftddm_trt.atomic import atomic_file


def report_figure(
    path: Path,
    lr: NDArray,
    sr: NDArray,
    metabolites: Sequence[str],
    sd: NDArray | None = None,
    t1: NDArray | None = None,
    flair: NDArray | None = None,
    title: str = "",
) -> Path:
    """Middle slice: per metabolite a row of LR input | SR output | uncertainty (when given); T1/FLAIR last.

    lr: (Z, M, n, n); sr, sd: (Z, M, 64, 64); t1, flair: (Z, 64, 64). Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = sr.shape[0] // 2
    cols = 3 if sd is not None else 2
    rows = len(metabolites) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.1 * rows), squeeze=False)
    for c, name in enumerate(metabolites):
        vmax = float(np.percentile(sr[z, c], 99.5)) or 1.0
        panels = [(lr[z, c], f"{name} LR {lr.shape[-1]}x{lr.shape[-1]}", "viridis", vmax),
                  (sr[z, c], f"{name} SR 64x64", "viridis", vmax)]
        if sd is not None:
            panels.append((sd[z, c], f"{name} SD", "magma", None))
        for ax, (img, label, cmap, vm) in zip(axes[c], panels):
            ax.imshow(np.rot90(img), cmap=cmap, vmin=0, vmax=vm, interpolation="nearest")
            ax.set_title(label, fontsize=8)
    for ax, (img, label) in zip(axes[-1], ((t1, "T1"), (flair, "FLAIR"))):
        if img is not None:
            ax.imshow(np.rot90(img[z]), cmap="gray", interpolation="nearest")
        ax.set_title(label if img is not None else f"{label} (absent)", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
    return path
