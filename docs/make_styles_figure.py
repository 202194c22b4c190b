"""Draw docs/phantom_styles.png: one subject of every phantom style (T1, FLAIR, NAA, tCho, Gln mask).

    python docs/make_styles_figure.py docs/phantom_styles.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ftddm_trt.data.phantom import make_subject  # noqa: E402
from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE, STYLES  # noqa: E402


def main(out: Path) -> None:
    fig, axes = plt.subplots(len(STYLES), 5, figsize=(11, 2.4 * len(STYLES)))
    for row, name in enumerate(STYLES):
        subj = make_subject(1, 0, style=name)
        z = subj.n_slices // 2
        panels = [
            (subj.t1[z], "T1", "gray"),
            (subj.flair[z], "FLAIR", "gray"),
            (subj.maps[z, 2], "NAA (mM)", "viridis"),
            (subj.maps[z, 1], "tCho (mM)", "viridis"),
            (subj.masks[z, 5], "Gln quality mask", "gray"),
        ]
        for col, (img, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img.T, origin="lower", cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name + (" (held out)" if name == HELD_OUT_STYLE else ""), fontsize=11)
            if row == 0:
                ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=70)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/phantom_styles.png"))
