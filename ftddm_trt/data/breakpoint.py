"""A model's breakpoint: the smallest acquired size N x N at which its default sampler still helps.

Below the sizes training draws from (``constants.TRAINED_LR_SIZES``, N = 8 to 32) a model extrapolates its
scale conditioning, and at some N the output stops being better than the zero-filled input. That N is
measured, not assumed: ``benchmarks/breakpoint.py`` super-resolves maps of a phantom style no network was
trained on at N = 2 to 32 in both mask protocols, and writes what it measured beside the weights as
``breakpoint.json``. ``upscale`` reads it:

- N below the breakpoint: refused unless ``--accept below-breakpoint``, the message quoting the figure;
- N at or above the breakpoint but below the trained sizes: runs, with a note quoting the figure;
- a model folder without ``breakpoint.json`` (e.g. a fine-tuned model): N below the trained sizes is
  refused unless accepted, since nothing was measured there.

A size is *usable* when, in both protocols, the mean PSNR gain over zero-filled is at least
``MIN_GAIN_DB`` and at least ``MIN_BETTER_FRACTION`` of the maps are better than zero-filled; the
breakpoint is the smallest measured N from which every measured size up is usable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftddm_trt.atomic import write_json_atomic
from ftddm_trt.constants import HR_SIZE, TRAINED_LR_SIZES
from ftddm_trt.data.input_checks import refuse_unless_accepted

#: File of a model folder that holds its measured breakpoint.
BREAKPOINT_FILE = "breakpoint.json"
#: Least mean PSNR gain over zero-filled (dB), in each protocol, for a size to be usable.
MIN_GAIN_DB: float = 1.0
#: Least share of maps better than zero-filled (PSNR), in each protocol, for a size to be usable.
MIN_BETTER_FRACTION: float = 0.9
#: The ``--accept`` reason that runs an input below the breakpoint.
ACCEPT_REASON = "below-breakpoint"


@dataclass(frozen=True)
class SizeFigures:
    """What the default sampler did at one acquired size N: per mask protocol (``lr``, ``hr``), the mean
    PSNR gain over zero-filled (dB) and the share of maps better than zero-filled."""

    n: int
    gain_db: dict[str, float]
    better_fraction: dict[str, float]

    @property
    def usable(self) -> bool:
        """Every protocol gains at least ``MIN_GAIN_DB`` on average with at least ``MIN_BETTER_FRACTION`` of maps."""
        return all(self.gain_db[p] >= MIN_GAIN_DB and self.better_fraction[p] >= MIN_BETTER_FRACTION
                   for p in self.gain_db)

    def words(self) -> str:
        """The figures in one phrase, e.g. ``+2.16 dB over zero-filled in lr (88% of maps better), ...``."""
        return ", ".join(f"{self.gain_db[p]:+.2f} dB over zero-filled in {p} ({100 * self.better_fraction[p]:.0f}% "
                         "of maps better)" for p in sorted(self.gain_db))


@dataclass(frozen=True)
class Breakpoint:
    """The measured breakpoint ``n`` of a model, the figures it rests on (one per measured N) and where they
    come from (``source``: style, seed, maps, sampler)."""

    n: int
    figures: tuple[SizeFigures, ...]
    source: str
    criterion: dict = field(default_factory=lambda: {"min_gain_db": MIN_GAIN_DB,
                                                     "min_better_fraction": MIN_BETTER_FRACTION})

    def figures_at(self, n: int) -> SizeFigures | None:
        """The figures measured at ``n``, else at the nearest measured size, else None."""
        if not self.figures:
            return None
        return min(self.figures, key=lambda f: (abs(f.n - n), f.n))

    def to_dict(self) -> dict:
        """The JSON form written as ``breakpoint.json``."""
        return {"n": self.n, "source": self.source, "criterion": self.criterion,
                "figures": [asdict(f) for f in self.figures]}

    @classmethod
    def from_dict(cls, d: dict) -> "Breakpoint":
        """The breakpoint ``to_dict`` wrote."""
        figures = tuple(SizeFigures(int(f["n"]), dict(f["gain_db"]), dict(f["better_fraction"]))
                        for f in d["figures"])
        return cls(int(d["n"]), figures, str(d.get("source", "")), dict(d.get("criterion", {})))


def breakpoint_of(figures: list[SizeFigures], source: str) -> Breakpoint:
    """The smallest measured N from which every measured size up is usable. ValueError when even the
    largest measured size is not usable (the model should then not be used at all)."""
    ordered = sorted(figures, key=lambda f: f.n)
    n = None
    for f in reversed(ordered):
        if not f.usable:
            break
        n = f.n
    if n is None:
        raise ValueError(f"no usable size: at N = {ordered[-1].n} the model gave {ordered[-1].words()}")
    return Breakpoint(n, tuple(ordered), source)


def load_breakpoint(root: Path | str) -> Breakpoint | None:
    """The breakpoint recorded in model folder ``root``, or None when it has none."""
    path = Path(root) / BREAKPOINT_FILE
    if not path.is_file():
        return None
    return Breakpoint.from_dict(json.loads(path.read_text()))


def write_breakpoint(root: Path | str, bp: Breakpoint) -> Path:
    """Write ``bp`` as ``root/breakpoint.json`` (atomically) and return the path."""
    return write_json_atomic(Path(root) / BREAKPOINT_FILE, bp.to_dict(), indent=1)


def check_acquired_size(root: Path, n: int, bp: Breakpoint | None, accept: set[str] | frozenset[str],
                        ) -> tuple[list[str], list[str]]:
    """Refuse (InputError naming ``--accept below-breakpoint``) or accept an N x N input for a model with
    breakpoint ``bp`` (None: not measured); ``root`` is the subject folder the message names.

    Returns ``(accepted, notes)`` as ``data.input_checks.check_subject`` does."""
    trained_min = min(TRAINED_LR_SIZES)
    if n >= trained_min:
        return [], []
    if bp is None:
        line = refuse_unless_accepted(
            root, ACCEPT_REASON, accept,
            f"{n} x {n} maps (s = {HR_SIZE / n:g}) are below the sizes the model was trained on (N >= {trained_min}) "
            "and the model folder records no measured breakpoint",
            "the output may be worse than zero-filled")
        return [line], []
    figures = bp.figures_at(n)
    measured = f"measured at N = {figures.n}: {figures.words()}" if figures else "not measured there"
    if n < bp.n:
        line = refuse_unless_accepted(
            root, ACCEPT_REASON, accept,
            f"{n} x {n} maps (s = {HR_SIZE / n:g}) are below the model's breakpoint N = {bp.n} ({measured})",
            "the output may be worse than zero-filled")
        return [line], []
    return [], [f"{n} x {n} maps (s = {HR_SIZE / n:g}) are below the sizes the model was trained on "
                f"(N >= {trained_min}) but not below its breakpoint N = {bp.n}; {measured}"]
