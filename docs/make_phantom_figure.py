"""Draw three phantom subjects: T1, FLAIR, the 7 metabolite maps, an s = 4 LR map and masks.

Usage: ``python docs/make_phantom_figure.py docs/phantom.png [--seed 0]``

Each row is one subject at the slice with the most tumour. Images are shown in neurological
view: x (array axis i) to the right, y (axis j) up (anterior at the top).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ftddm_trt.constants import METABOLITES  # noqa: E402
from ftddm_trt.data.kspace import kspace_truncate  # noqa: E402
from ftddm_trt.data.masks import lr_qc_maps, quality_mask_from_qc, support_mask_from_lr  # noqa: E402
from ftddm_trt.data.phantom import LABELS, make_subject  # noqa: E402


def _show(ax: plt.Axes, img: np.ndarray, title: str, cmap: str = "inferno", vmax: float | None = None) -> None:
    ax.imshow(img.T, origin="lower", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", type=int, nargs="*", default=None)
    args = parser.parse_args()

    tumour_labels = (LABELS.index("solid"), LABELS.index("necrosis"))
    chosen = []
    index = 0
    wanted = args.subjects
    while len(chosen) < 3:
        if wanted is not None:
            sub = make_subject(wanted[len(chosen)], args.seed)
        else:
            sub = make_subject(index, args.seed)
            index += 1
            if not sub.has_tumour:
                continue
        chosen.append(sub)

    n = 16  # s = 4
    gly = METABOLITES.index("Gly")
    cols = 2 + len(METABOLITES) + 3
    fig, axes = plt.subplots(3, cols, figsize=(1.6 * cols, 1.75 * 3 + 0.3))
    for row, sub in zip(axes, chosen):
        count = np.isin(sub.labels, tumour_labels).sum(axis=(1, 2))
        z = int(np.argmax(count)) if count.max() > 0 else sub.n_slices // 2
        _show(row[0], sub.t1[z], f"{sub.subject_id} z={z}\nT1", "gray", 1.1)
        _show(row[1], sub.flair[z], "FLAIR", "gray", 1.1)
        for c, name in enumerate(METABOLITES):
            vmax = float(np.percentile(sub.maps[:, c][sub.masks[:, c]], 99.5)) if sub.masks[:, c].any() else 1.0
            _show(row[2 + c], sub.maps[z, c], name, vmax=vmax)
        tcho = METABOLITES.index("tCho")
        lr, zf = kspace_truncate(sub.maps[z, tcho], n)
        _show(row[2 + len(METABOLITES)], lr, f"tCho LR {n}x{n}")
        snr_lr, fwhm_lr = lr_qc_maps((sub.snr[z, gly], sub.fwhm[z, gly]), n)
        m_lr = support_mask_from_lr(quality_mask_from_qc(snr_lr, fwhm_lr))
        _show(row[3 + len(METABOLITES)], sub.masks[z, gly].astype(float), "Gly mask (64)", "gray", 1)
        _show(row[4 + len(METABOLITES)], m_lr.astype(float) + sub.masks[z, gly], "Gly M (lr) + mask", "viridis", 2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
