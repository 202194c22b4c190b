"""Super-resolve every ``sub-*`` subject of a cohort folder, as `upscale` does one: the application logic
behind `ftddm-trt upscale-cohort`.

``run_cohort`` takes the options of `upscale` (``UpscaleOptions``) and runs the same per-subject function,
``upscale_with_backend``, over one backend opened once. Several Triton URLs form a ``TritonPool``.

- ``OUT/<subject>/`` is written atomically and under its lock, as by `upscale`; staging folders of
  dead runs are removed (a live run's are left alone).
- A subject whose ``OUT/<subject>/run.json`` records the same settings fingerprint (input, sampler,
  data-consistency mode, kind, seed, batching, samples, metabolites, model hashes) and whose accepted
  degraded inputs are still accepted is skipped: an interrupted cohort resumes. One finished with other
  settings is refused (reported failed) unless ``--force`` (which, as for `upscale`, replaces only a
  folder ftddm-trt wrote).
- Degraded inputs are refused per subject, as by `upscale` (--kind, --accept, --allow-missing-anatomy);
  a refused subject is a bad subject.
- A bad subject is reported and skipped; the others go on. When the servers are gone
  (``TritonUnavailable``) the run stops: finished subjects stay, nothing partial is written.
- ``OUT/cohort.csv`` (rewritten atomically after each subject): subject, status, seconds, NFE, maps,
  servers, message. Exit code 0 when every subject is done or skipped, else 1.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftddm_trt.atomic import OutputBusy, OutputLock, remove_dead_staging, write_text_atomic
from ftddm_trt.workflows.console import console, maps_progress
from ftddm_trt.workflows.upscale import (
    UpscaleError,
    UpscaleOptions,
    accepted_covered,
    check_options,
    load_subject,
    n_maps,
    open_upscale_backend,
    report_loaded,
    settings_fingerprint,
    upscale_with_backend,
)

CSV_NAME = "cohort.csv"
CSV_FIELDS = ("subject", "status", "seconds", "nfe", "maps", "servers", "message")
#: Every status a subject can end with, in the order the summary names them.
END_STATUSES = ("done", "skipped", "failed", "not run")


class CohortError(Exception):
    """The cohort cannot be run at all (no such folder, no subject, output overlapping an input)."""


@dataclass
class SubjectRow:
    """One line of cohort.csv. status: pending, done, skipped, failed, not run."""

    subject: str
    status: str = "pending"
    seconds: float = 0.0
    nfe: int | None = None
    maps: int | None = None
    servers: str = ""
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def csv_row(self) -> list[Any]:
        """The row's cells in ``CSV_FIELDS`` order."""
        return [self.subject, self.status, f"{self.seconds:.3f}", "" if self.nfe is None else self.nfe,
                "" if self.maps is None else self.maps, self.servers, self.message]


def find_subjects(root: Path) -> list[Path]:
    """``ROOT/sub-*`` folders, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-"))


def write_csv(path: Path, rows: list[SubjectRow]) -> None:
    """cohort.csv, replaced atomically (a reader never sees half a file)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for r in rows:
        w.writerow(r.csv_row())
    write_text_atomic(path, buf.getvalue())


def finished_record(out_dir: Path) -> dict | None:
    """The run.json of a finished subject folder, or None (absent or unreadable)."""
    try:
        return json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None


def servers_of(backend, usage: dict[str, int] | None) -> str:
    """Which server(s) ran a subject's batches: ``url:batches;...``, the one URL, or the in-process runtime."""
    if usage is not None:
        return ";".join(f"{u}:{n}" for u, n in sorted(usage.items()))
    url = getattr(backend, "url", None)
    return url if url else f"{backend.name} (in-process)"


def run_cohort(root: Path, out: Path, opts: UpscaleOptions, force: bool = False) -> list[SubjectRow]:
    """Super-resolve every subject of ``root`` into ``out`` (see the module docstring); returns the rows.

    CohortError or UpscaleError (settings, backend) before any subject when the cohort cannot run."""
    from rich.progress import TextColumn

    from ftddm_trt.engine.triton_backend import TritonUnavailable

    if not root.is_dir():
        raise CohortError(f"{root}: cohort folder does not exist")
    o = out.resolve()
    for src in (root, opts.model, opts.onnx, opts.engines):
        r = None if src is None else Path(src).resolve()
        if r is not None and (o == r or r in o.parents or o in r.parents):
            raise CohortError(f"output folder {o} and input folder {r} overlap; choose another place")
    if out.exists() and not out.is_dir():
        raise CohortError(f"{out} exists and is not a folder")
    subjects = find_subjects(root)
    if not subjects:
        raise CohortError(f"{root} holds no sub-* subject folder")
    spec = check_options(opts)
    backend = open_upscale_backend(opts, spec)
    out.mkdir(parents=True, exist_ok=True)
    for subject_dir in subjects:  # staging folders of killed runs: never published, never complete
        try:
            with OutputLock(out / subject_dir.name):
                remove_dead_staging(out / subject_dir.name)
        except OutputBusy:  # another process is writing that subject now: its staging folder is alive
            pass
    csv_path = out / CSV_NAME
    rows = [SubjectRow(s.name) for s in subjects]
    with backend:
        info = backend.describe()
        todo: list[tuple[int, Path]] = []
        total = 0
        for k, subject_dir in enumerate(subjects):  # plan: skip finished ones, read the others once to count maps
            row, dest = rows[k], out / subject_dir.name
            want = settings_fingerprint(subject_dir, opts, spec, info)
            if dest.exists():
                rec = finished_record(dest)
                if rec is not None and rec.get("fingerprint") == want and accepted_covered(rec, opts):
                    row.status, row.nfe, row.message = (
                        "skipped",
                        rec.get("nfe"),
                        "finished before with the same settings",
                    )
                    row.maps = len(rec.get("metabolites", [])) * int(rec.get("slices", 0)) * int(rec.get("samples", 1))
                    row.servers = (rec.get("backend") or {}).get("url") or ";".join(
                        (rec.get("backend") or {}).get("urls", [])
                    )
                    continue
                if not force:
                    row.status = "failed"
                    row.message = (
                        f"{dest} holds results of other settings (or no run.json); pass --force to replace them"
                    )
                    continue
            try:
                row.maps = n_maps(load_subject(subject_dir, opts, spec), opts)
            except UpscaleError as err:
                row.status, row.message = "failed", str(err)
                continue
            todo.append((k, subject_dir))
            total += row.maps
        for row in rows:
            if row.status == "failed":
                console.print(f"[red]{row.subject}: {row.message}[/]", highlight=False)
        skipped = sum(r.status == "skipped" for r in rows)
        if skipped:
            console.print(f"{skipped} subject(s) already finished with the same settings: skipped")
        write_csv(csv_path, rows)
        usage_of = getattr(backend, "take_usage", None)
        with maps_progress("cohort", TextColumn("{task.fields[subjects]}")) as bar:
            task = bar.add_task("maps", total=total, subjects=f"0/{len(todo)} subjects")
            maps_before = 0
            for n_done, (k, subject_dir) in enumerate(todo):
                row = rows[k]
                bar.update(task, subjects=f"{n_done}/{len(todo)} subjects ({subject_dir.name})")
                if usage_of is not None:
                    usage_of()
                t0 = time.perf_counter()
                stop = False
                try:
                    loaded = load_subject(subject_dir, opts, spec)
                    report_loaded(loaded, prefix=f"{subject_dir.name}: ")
                    rec = upscale_with_backend(
                        loaded,
                        out / subject_dir.name,
                        opts,
                        spec,
                        backend,
                        force=force,
                        progress=lambda done, _t, base=maps_before: bar.update(task, completed=base + done),
                        command="upscale-cohort",
                    )
                    row.status, row.nfe, row.message = "done", rec["nfe"], ""
                except TritonUnavailable as err:  # no server left: stop, keep what is finished
                    row.status, row.message, stop = "failed", f"servers gone: {err}", True
                except KeyboardInterrupt:
                    row.status, row.message = "failed", "interrupted"
                    _close_rows(rows)
                    write_csv(csv_path, rows)
                    raise
                except Exception as err:  # a bad subject: report, go on with the others
                    row.status, row.message = "failed", f"{type(err).__name__}: {err}"
                row.seconds = time.perf_counter() - t0
                row.servers = servers_of(backend, usage_of() if usage_of is not None else None)
                maps_before += row.maps or 0
                bar.update(task, completed=maps_before, subjects=f"{n_done + 1}/{len(todo)} subjects")
                if row.status == "failed":
                    console.print(f"[red]{row.subject} failed:[/] {row.message}", highlight=False)
                write_csv(csv_path, rows)
                if stop:
                    console.print("[bold red]stopping:[/] no Triton server is left; finished subjects are kept")
                    break
    _close_rows(rows)
    write_csv(csv_path, rows)
    return rows


def _close_rows(rows: list[SubjectRow]) -> None:
    for r in rows:
        if r.status == "pending":
            r.status, r.message = "not run", "the run stopped before this subject"


def status_counts(rows: list[SubjectRow]) -> dict[str, int]:
    """How many subjects ended with each of ``END_STATUSES``."""
    return {s: sum(r.status == s for r in rows) for s in END_STATUSES}
