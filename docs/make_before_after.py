"""Draw the README's before/after picture from the output folder of `ftddm-trt demo`.

Usage: ``python docs/make_before_after.py [DEMO_OUT] [--out docs/before_after.png] [--metabolite NAA]``

``DEMO_OUT`` (default ``demo_out``, what ``make demo`` writes) holds ``input/sub-000`` (the phantom
subject with its 64 x 64 truth) and ``sr/`` (the super-resolved maps). One slice of one metabolite:
the acquired N x N map, its zero-filled 64 x 64 interpolation, the FTDDM output and the truth, the
last three with PSNR / SSIM inside the truth's quality mask. The slice is the one whose truth map has
the most signal. Images are in neurological view (x to the right, anterior at the top).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ftddm_trt.data.kspace import zero_fill  # noqa: E402
from ftddm_trt.data.metrics import psnr, ssim  # noqa: E402
from ftddm_trt.data.nifti.read import read_map_folder  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_out", nargs="?", type=Path, default=Path("demo_out"))
    ap.add_argument("--out", type=Path, default=Path("docs/before_after.png"))
    ap.add_argument("--metabolite", default="NAA")
    args = ap.parse_args(argv)

    subject = args.demo_out / "input" / "sub-000"
    met = [args.metabolite]
    lr, _, _ = read_map_folder(subject, met)                                  # (Z, 1, n, n)
    sr, _, _ = read_map_folder(args.demo_out / "sr", met)                     # (Z, 1, 64, 64)
    truth, _, _ = read_map_folder(subject / "truth", met)                     # (Z, 1, 64, 64)
    mask, _, _ = read_map_folder(subject / "truth" / "masks", met, subfolder=None)
    lr, sr, truth, mask = lr[:, 0], sr[:, 0], truth[:, 0], mask[:, 0] > 0.5
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    n = lr.shape[-1]
    zf = zero_fill(lr[z])

    vmax = float(np.percentile(truth[z][mask[z]], 99.5)) if mask[z].any() else float(truth[z].max())
    panels = [(np.kron(lr[z], np.ones((64 // n, 64 // n))), f"acquired {n} x {n}", None),
              (zf, "zero-filled", zf), (sr[z], "FTDDM (default sampler)", sr[z]), (truth[z], "truth 64 x 64", None)]
    fig, axes = plt.subplots(1, 4, figsize=(10, 3.1), dpi=100)
    for ax, (img, title, scored) in zip(axes, panels):
        ax.imshow(img.T, origin="lower", cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest")
        if scored is not None:
            p = float(psnr(scored, truth[z], mask[z]))
            s = float(ssim(scored, truth[z], mask[z]))
            title += f"\nPSNR {p:.1f} dB, SSIM {s:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    title = f"{args.metabolite}, phantom sub-000 slice {z}, s = {64 // n} (metrics inside the truth's quality mask)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
