"""FSL-MRS file names -> the 7 metabolites, as ``fsl_mrsi`` writes them.

``fsl_mrsi`` writes one map per fitted basis spectrum (``concs/<kind>/Cr.nii.gz``, ``PCr.nii.gz``, ...)
and, with ``--combine Cr PCr``, one more per combination, named by joining the parts with ``+`` in the
order given (``Cr+PCr.nii.gz``). Its qc maps exist only for the fitted spectra (``qc/Cr_snr.nii.gz``,
``qc/PCr_snr.nii.gz``), never for a combination.

Each metabolite is read from the first of, in order:

1. a file already named as the total (``tCr``, ``tCho``);
2. a combination of its parts, in any order (``Cr+PCr`` / ``PCr+Cr``; ``GPC+PCh``; ``NAA+NAAG``): total NAA
   is ``NAA+NAAG`` when present;
3. a single spectrum that is the metabolite itself (``NAA``, ``Glu``, ``Ins`` / ``mI``, ``Gln``, ``Gly``).

Cr or PCr alone is not total creatine, nor GPC or PCh alone total choline: they are never read as such.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from ftddm_trt.constants import METABOLITES


@dataclass(frozen=True)
class Naming:
    """File stems that hold one metabolite: ``totals`` and ``singles`` are stems, ``parts`` are the
    spectra a combination sums (each tuple one alternative)."""

    totals: tuple[str, ...] = ()
    parts: tuple[tuple[str, ...], ...] = ()
    singles: tuple[str, ...] = ()

    def candidates(self) -> list[tuple[str, tuple[str, ...]]]:
        """``(stem, components)`` in the order they are tried; a stem's qc files are its components'."""
        out = [(t, (t,)) for t in self.totals]
        for combo in self.parts:
            out += [("+".join(p), combo) for p in itertools.permutations(combo)]
        return out + [(s, (s,)) for s in self.singles]


NAMING: dict[str, Naming] = {
    "tCr": Naming(totals=("tCr", "tCre"), parts=(("Cr", "PCr"),)),
    "tCho": Naming(totals=("tCho",), parts=(("GPC", "PCh"), ("GPC", "PC"), ("GPC", "PCho"))),
    "NAA": Naming(parts=(("NAA", "NAAG"),), singles=("NAA",)),
    "Glu": Naming(singles=("Glu",)),
    "Ins": Naming(singles=("Ins", "mI", "myo-Inositol")),
    "Gln": Naming(singles=("Gln",)),
    "Gly": Naming(singles=("Gly",)),
}


@dataclass(frozen=True)
class MapFile:
    """The file a metabolite is read from and the spectra it sums (whose qc maps describe it)."""

    metabolite: str
    path: Path
    components: tuple[str, ...]


def nifti_stem(p: Path) -> str:
    """File name without ``.nii.gz`` / ``.nii``."""
    for ext in (".nii.gz", ".nii"):
        if p.name.endswith(ext):
            return p.name[: -len(ext)]
    return p.name


def resolve_maps(files: list[Path], suffix: str = "") -> tuple[dict[str, MapFile], list[Path], list[str]]:
    """Pick each metabolite's file among ``files`` (stems minus ``suffix``, case-insensitive).

    Returns ``(found, skipped, notes)``: metabolite -> MapFile in ``METABOLITES`` order, the files no
    metabolite uses (other spectra, parts of a combination used instead), and a note for each metabolite
    read from a combination while a lesser candidate was also present (which file fed it, which not)."""
    by_stem: dict[str, Path] = {}
    for p in files:
        stem = nifti_stem(p)
        if suffix:
            if not stem.lower().endswith(suffix.lower()):
                continue
            stem = stem[: -len(suffix)]
        by_stem.setdefault(stem.lower(), p)
    found: dict[str, MapFile] = {}
    used: set[str] = set()
    notes: list[str] = []
    for met in METABOLITES:
        present = [(stem, comps) for stem, comps in NAMING[met].candidates() if stem.lower() in by_stem]
        if not present:
            continue
        stem, comps = present[0]
        found[met] = MapFile(met, by_stem[stem.lower()], comps)
        used.add(stem.lower())
        passed = [by_stem[s.lower()].name for s, _ in present[1:] if s.lower() != stem.lower()]
        if passed:
            notes.append(f"{met}: read from {by_stem[stem.lower()].name}; {', '.join(passed)} not used")
    skipped = [p for s, p in by_stem.items() if s not in used]
    return found, skipped, notes
