"""`ftddm-trt upscale-cohort ROOT --out OUT`: every ``sub-*`` subject of ROOT, as `upscale` does one
(``workflows.cohort.run_cohort``).

It takes every option of `upscale` (the signature is derived from ``upscale_cmd``'s, so the two never
drift apart), ``--url`` repeatable and ``--clients-per-server``. Exit code 0 when every subject is done or
skipped, else 1.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from ftddm_trt.atomic import OutputError
from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import spellings
from ftddm_trt.cli.common import console, fail
from ftddm_trt.cli.upscale import options_from_params, upscale_cmd
from ftddm_trt.workflows.cohort import CSV_NAME, CohortError, run_cohort, status_counts
from ftddm_trt.workflows.upscale import UpscaleError


def cohort_cmd(**params: Any) -> None:
    """Super-resolve every sub-* subject of ROOT into OUT/<subject>/ (resumable; see OUT/cohort.csv)."""
    opts = options_from_params(params)
    try:
        rows = run_cohort(params["root"], params["out"], opts, force=params["force"])
    except (CohortError, UpscaleError, OutputError) as err:
        fail(str(err))
    counts = status_counts(rows)
    console.print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; summary in {params['out'] / CSV_NAME}")
    if counts["failed"] or counts["not run"]:
        raise typer.Exit(1)


def _cohort_signature() -> tuple[inspect.Signature, dict[str, Any]]:
    """``upscale``'s options (their types, defaults and help) with ROOT instead of SUBJECT_DIR, --out, --url
    repeatable, --clients-per-server added and --force redefined for a cohort."""
    P = inspect.Parameter
    hints = typing.get_type_hints(upscale_cmd)
    params = []
    for p in inspect.signature(upscale_cmd).parameters.values():
        if p.name == "force":
            continue
        if p.name == "subject_dir":
            p = P("root", P.POSITIONAL_OR_KEYWORD, annotation=Path,
                  default=typer.Argument(..., help="Cohort folder holding sub-* subject folders (FSL-MRS layout)."))
        elif p.name == "out":
            p = p.replace(annotation=Path, default=typer.Option(
                ..., "--out", help="Output folder: OUT/<subject>/ as `upscale` writes it, and cohort.csv."))
        elif p.name == "url":
            p = p.replace(
                annotation=Optional[list[str]],
                default=typer.Option(
                    None,
                    "--url",
                    help="Triton server HOST:GRPC_PORT for --backend triton; repeat it to spread batches over several "
                         "servers.",
                    show_default="none",
                ),
            )
        else:
            p = p.replace(annotation=hints[p.name])
        params.append(p)
    params.append(
        P(
            "clients_per_server",
            P.POSITIONAL_OR_KEYWORD,
            annotation=int,
            default=typer.Option(
                1,
                "--clients-per-server",
                min=1,
                help="With --backend triton: concurrent requests per server (met by Triton's dynamic batcher).",
            ),
        )
    )
    params.append(P("force", P.POSITIONAL_OR_KEYWORD, annotation=bool, default=typer.Option(
        False, "--force", help="Replace subject outputs finished with other settings (they are refused otherwise).",
        show_default="off")))
    sig = inspect.Signature(params, return_annotation=None)
    return sig, {p.name: p.annotation for p in params}


cohort_cmd.__signature__, cohort_cmd.__annotations__ = _cohort_signature()  # type: ignore[attr-defined]
app.command("upscale-cohort", cls=spellings(positionals=("--out",)), rich_help_panel="Use")(cohort_cmd)
