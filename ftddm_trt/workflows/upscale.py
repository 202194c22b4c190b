"""Super-resolve subject folders: the application logic behind `ftddm-trt upscale` and `upscale-cohort`.

One subject goes through ``check_options`` (settings, before any work), ``load_subject`` (read, degraded
inputs refused or accepted, data consistency decided by its mask), ``open_upscale_backend`` and
``upscale_with_backend`` (sample, write the folder atomically under its lock); ``upscale_to_folder`` runs
them for one subject and ``workflows.cohort.run_cohort`` for every subject of a cohort over one backend.
Problems are raised as ``UpscaleError`` (or ``atomic.OutputError`` for the output folder), naming why.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ftddm_trt import __version__
from ftddm_trt.atomic import OutputError, atomic_dir, check_output
from ftddm_trt.constants import T_TRUNC, USER_DEFAULT_TAU_F
from ftddm_trt.diffusion.samplers.dpm_solver import DEFAULT_LAMBDA_MIN
from ftddm_trt.integrity import IntegrityError, check_temperature
from ftddm_trt.workflows.console import console, maps_progress

if TYPE_CHECKING:
    from ftddm_trt.data.nifti.read import SubjectInput
    from ftddm_trt.engine.backend import Backend
    from ftddm_trt.engine.pipeline import SamplerSpec

@dataclass
class UpscaleOptions:
    """Everything `upscale` (and `demo`, `upscale-cohort`) lets a user choose."""

    backend: str = "onnxruntime"
    sampler: str = "auto"  # resolve_sampler: the model's distilled student where it can run, else ftddm-dpmpp
    ttrunc: int = T_TRUNC
    steps: Optional[int] = None
    passes: int = 1
    tau_d: float = 0.9
    tau_f: float = USER_DEFAULT_TAU_F
    clip_x0: Optional[tuple[float, float]] = (0.0, 3.0)
    lambda_min: Optional[float] = DEFAULT_LAMBDA_MIN
    sde: bool = False
    samples: int = 1
    metabolites: Optional[list[str]] = None
    seed: int = 0
    model: Optional[Path] = None
    onnx: Optional[Path] = None
    engines: Optional[Path] = None
    batch_size: int = 16
    url: Optional[str | list[str]] = None  # a list: several Triton servers (a pool)
    scale: Optional[float] = None
    server_loop: bool = False
    data_consistency: str = "auto"
    qc_consistency: Optional[float] = None  # None: the model's fine-mask estimator's weight, else QC_CONSISTENCY_WEIGHT
    kind: Optional[str] = None
    allow_missing_anatomy: bool = False
    accept: tuple[str, ...] = ()
    retry_s: float = 30.0
    clients_per_server: int = 1  # concurrent requests per Triton server (upscale-cohort)


class UpscaleError(Exception):
    """One subject cannot be super-resolved; the message names why. Nothing was written."""


@dataclass
class LoadedSubject:
    """A subject read and checked for one run.

    subject_dir: its folder; input: the maps as read (metabolites as asked) of the first concentration
    kind; others: the same subject's other kinds, each super-resolved alike into ``concs/<kind>``; spec:
    the sampler it runs (``data_consistency`` decided by its mask, ``pipeline.consistency_for``);
    accepted: degraded inputs accepted, as sentences; notes: remarks needing no acceptance (reader's and checks')."""

    subject_dir: Path
    input: "SubjectInput"
    spec: "SamplerSpec"
    accepted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    others: list["SubjectInput"] = field(default_factory=list)

    @property
    def inputs(self) -> list["SubjectInput"]:
        """Every kind read, the first one first."""
        return [self.input, *self.others]


def accept_set(opts: UpscaleOptions) -> set[str]:
    """The degraded inputs ``opts`` accepts (``--accept`` plus ``--allow-missing-anatomy``)."""
    return set(opts.accept) | ({"missing-anatomy"} if opts.allow_missing_anatomy else set())


def upscale_inputs(subject_dir: Path, opts: UpscaleOptions) -> tuple[Path | None, ...]:
    """Folders a subject's output must neither lie in nor hold (the subject, the model and its exports)."""
    return (subject_dir, opts.model, opts.onnx, opts.engines)


#: ``--sampler auto`` (the default): the model's distilled student where it can run, else ``SOLVER_SAMPLER``.
AUTO_SAMPLER = "auto"
#: The sampler ``auto`` falls back to: the flow, then 20 DPM-Solver++ steps of the model's own UNet.
SOLVER_SAMPLER = "ftddm-dpmpp"
#: The backends that read the networks from the model folder itself (so they can run its ``distilled/``).
FOLDER_BACKENDS = ("onnxruntime", "torch")


def resolve_sampler(opts: UpscaleOptions) -> tuple[str, str]:
    """The sampler ``opts`` runs, and why, in words for run.json and the terminal.

    ``--sampler auto`` runs ``ftddm-distilled`` when the model folder has a distilled student of its own UNet
    and flow (``models.model_set.distilled_teacher_mismatch``), the networks are read from that folder
    (onnxruntime or torch, no ``--onnx``), and no solver option (``--steps``, ``--passes``, ``--sde``) asks for
    the solver; otherwise ``ftddm-dpmpp``."""
    from ftddm_trt.models.model_set import distilled_teacher_mismatch

    if opts.sampler != AUTO_SAMPLER:
        return opts.sampler, "--sampler " + opts.sampler
    if opts.backend not in FOLDER_BACKENDS or opts.onnx is not None:
        return SOLVER_SAMPLER, f"auto: {SOLVER_SAMPLER}, as the networks come from an export or a server"
    if opts.steps is not None or opts.passes != 1 or opts.sde:
        return SOLVER_SAMPLER, f"auto: {SOLVER_SAMPLER}, as a solver option (--steps, --passes, --sde) was given"
    try:
        mismatch = distilled_teacher_mismatch(opts.model)
    except FileNotFoundError:
        return SOLVER_SAMPLER, f"auto: {SOLVER_SAMPLER}, as the model has no distilled student"
    if mismatch is not None:
        return SOLVER_SAMPLER, f"auto: {SOLVER_SAMPLER}, as {mismatch}"
    return "ftddm-distilled", "auto: ftddm-distilled, the model's distilled student"


def check_options(opts: UpscaleOptions) -> "SamplerSpec":
    """The sampler spec of ``opts``; UpscaleError for settings that cannot run (checked before any work).

    The spec's ``data_consistency`` is decided per subject by ``load_subject``."""
    from ftddm_trt.engine.pipeline import SamplerSpec, consistency_for
    from ftddm_trt.models.model_set import distilled_folder, distilled_steps

    sampler, _ = resolve_sampler(opts)
    steps = opts.steps
    if sampler == "ftddm-distilled" and steps is None:
        try:  # the student runs the steps it was trained for
            steps = distilled_steps(distilled_folder(opts.model))
        except FileNotFoundError as err:
            raise UpscaleError(str(err)) from err
    try:
        check_temperature("--tau-d", opts.tau_d)
        check_temperature("--tau-f", opts.tau_f)
        spec = SamplerSpec(sampler, ttrunc=opts.ttrunc, steps=steps, tau_d=opts.tau_d, tau_f=opts.tau_f,
                           clip_x0=opts.clip_x0, lambda_min=opts.lambda_min, sde=opts.sde,
                           passes=opts.passes)
        consistency_for(spec, opts.data_consistency, False)  # a bad --data-consistency is named before any work
    except ValueError as err:
        raise UpscaleError(str(err)) from err
    if opts.qc_consistency is not None and not 0.0 <= opts.qc_consistency <= 1.0:
        raise UpscaleError(f"--qc-consistency must be in [0, 1], got {opts.qc_consistency}")
    if opts.samples < 1:
        raise UpscaleError(f"--samples must be >= 1, got {opts.samples}")
    if opts.samples > 1 and spec.name == "munet":
        raise UpscaleError(f"--samples {opts.samples} with munet would repeat one identical output: MUNet has no "
                           "randomness (--sampler flow-enhancer with --tau-f > 0 draws samples around it)")
    if opts.samples > 1 and spec.deterministic:
        raise UpscaleError(
            f"--samples {opts.samples} with {spec.name} at --tau-f {spec.tau_f:g} would repeat one identical "
            "output: give --tau-f > 0 (0.9 is the paper's temperature) to draw different samples"
        )
    if opts.server_loop and opts.backend != "triton":
        raise UpscaleError("--server-loop needs --backend triton (the loop runs inside Triton's ftddm_sampler model)")
    if opts.backend in ("torch", "onnxruntime") and opts.onnx is None:
        from ftddm_trt.models.model_set import ModelSet

        try:
            # a flow (or TDPM generator) for this Ttrunc must exist, and a distilled model for ftddm-distilled
            models = ModelSet.open(networks_folder(opts, spec), _flow_ttrunc(spec), start=spec.start_network or "flow")
            models.require(spec.baseline_networks, spec.name)  # munet.* (and flow_enhancer.*) for the baselines
        except FileNotFoundError as err:
            raise UpscaleError(str(err)) from err
    return spec


def _flow_ttrunc(spec) -> int | None:
    return spec.ttrunc if spec.uses_flow else None


def networks_folder(opts: UpscaleOptions, spec) -> Path | None:
    """The model folder whose networks ``spec`` runs: ``--model`` (None: the shipped model), or its distilled
    model for ``ftddm-distilled`` (FileNotFoundError when it has none)."""
    from ftddm_trt.models.model_set import distilled_folder

    return distilled_folder(opts.model) if spec.distilled_unet else opts.model


def open_upscale_backend(opts: UpscaleOptions, spec) -> "Backend":
    """The backend ``opts`` names (a pool of servers for ``--backend triton`` with several URLs)."""
    from ftddm_trt.engine.factory import open_backend
    from ftddm_trt.engine.pipeline import require_flow_ttrunc

    try:
        backend = open_backend(opts.backend, model=networks_folder(opts, spec), onnx_dir=opts.onnx,
                               engine_dir=opts.engines,
                               url=opts.url, ttrunc=_flow_ttrunc(spec), log=console.print, retry_s=opts.retry_s,
                               clients_per_server=opts.clients_per_server, start=spec.start_network or "flow",
                               require=spec_networks(spec) if spec.baseline_networks else None)
    except IntegrityError as err:
        raise UpscaleError(f"refusing to run backend {opts.backend!r}: {err}") from err
    except Exception as err:  # every runtime has its own errors: report them by name
        raise UpscaleError(f"cannot open backend {opts.backend!r}: {type(err).__name__}: {err}") from err
    try:  # before anything is written: the flow must be the one trained for this Ttrunc, of this model
        require_flow_ttrunc(backend, spec)
        require_same_model(backend, opts, spec)
    except Exception as err:  # TtruncMismatch, ModelMismatch, or the server cannot be asked
        backend.close()
        raise UpscaleError(str(err)) from err
    return backend


def spec_networks(spec) -> list[str]:
    """The networks ``spec`` runs."""
    if spec.baseline_networks:
        return list(spec.baseline_networks)
    return ["unet_full" if spec.full_chain_unet else "unet"] + (["flow"] if spec.uses_flow else [])


def require_same_model(backend: "Backend", opts: UpscaleOptions, spec) -> None:
    """Refuse (ModelMismatch, naming the network and both hashes) a backend whose networks were not made
    from ``--model`` (default: the shipped model): the fine-mask estimator and run.json come from that
    folder, so another model's networks would mix two models. The checked hashes go to the backend
    (Triton's server loop checks them again in the server)."""
    from ftddm_trt.engine.model_check import check_same_model
    from ftddm_trt.models.model_set import ModelSet

    try:
        models = ModelSet.open(networks_folder(opts, spec), _flow_ttrunc(spec), start=spec.start_network or "flow")
    except FileNotFoundError as err:
        raise UpscaleError(str(err)) from err
    expected = {n: h for n, h in models.hashes().items() if n in spec_networks(spec)}
    lacking = [n for n in spec_networks(spec) if n not in expected]
    if lacking:
        raise UpscaleError(
            f"the model {models.root} has no {', '.join(lacking)} network, which the {spec.name} sampler needs"
        )
    check_same_model(
        expected, backend.describe().get("models", {}), spec_networks(spec), backend.origin(), str(models.root)
    )
    backend.expect_weights(expected)


def model_fingerprint(spec, backend_info: dict) -> dict[str, str]:
    """Hashes of the networks ``spec`` runs, as the backend reports them (ONNX sha256, else weights)."""
    needed = spec_networks(spec)
    hashes = backend_info.get("onnx") or backend_info.get("engines") or backend_info.get("models") or {}
    return {n: str(hashes.get(n, "")) for n in needed}


@functools.lru_cache(maxsize=4)
def fine_mask_net(model: Optional[Path]):
    """The fine-mask estimator of model folder ``model`` (default: the shipped model), hash-verified, or None.

    It prepares the ``lr`` qc consistency step on the client, whichever backend runs the networks, so it
    is read from ``--model`` even when ``--onnx``, ``--engines`` or Triton serve them."""
    from ftddm_trt.models.model_set import ModelSet

    try:
        return ModelSet.open(model).fine_mask_net()
    except IntegrityError as err:
        raise UpscaleError(f"refusing the fine-mask estimator: {err}") from err


@functools.lru_cache(maxsize=4)
def fine_mask_sha256(model: Optional[Path]) -> Optional[str]:
    """sha256 of the fine-mask estimator ``fine_mask_net`` would load, or None (hashed once per folder and
    process: the fingerprint and run.json of every subject of a cohort ask for it)."""
    from ftddm_trt.models.model_set import ModelSet

    return ModelSet.open(model).fine_mask_sha256()


def settings_fingerprint(subject_dir: Path, opts: UpscaleOptions, spec, backend_info: dict) -> dict:
    """What decides a subject's output: input, sampler (``spec`` from ``check_options``), data-consistency
    mode, concentration kind, seed, batching, samples, metabolites and the model hashes. The backend
    itself is left out: every backend gives the same maps for the same seed and batch size (to float
    rounding). Degraded inputs accepted are checked apart (``accepted_covered``)."""
    return _json_normal(
        {
            "input": str(subject_dir.resolve()),
            "sampler": spec.to_dict(),
            "samples": opts.samples,
            "seed": opts.seed,
            "batch_size": opts.batch_size,
            "metabolites": list(opts.metabolites) if opts.metabolites else None,
            "scale": opts.scale,
            "server_loop": opts.server_loop,
            "data_consistency": opts.data_consistency,
            "qc_consistency": opts.qc_consistency,
            "fine_mask": fine_mask_sha256(opts.model),
            "kind": opts.kind,
            "models": model_fingerprint(spec, backend_info),
        }
    )


def accepted_covered(record: dict, opts: UpscaleOptions) -> bool:
    """True when every degraded input a finished run accepted (run.json ``accepted``) is accepted by ``opts``."""
    return {line.split(":", 1)[0] for line in record.get("accepted", [])} <= accept_set(opts)


def _json_normal(d: dict) -> dict:
    """``d`` as it reads back from run.json (tuples become lists), so that fingerprints compare equal."""
    return json.loads(json.dumps(d, default=str))


def load_subject(subject_dir: Path, opts: UpscaleOptions, spec) -> LoadedSubject:
    """Read a subject folder for ``spec`` (from ``check_options``): every concentration kind present, or
    the one --kind names, the metabolites it asks for, degraded inputs refused unless accepted, data
    consistency set from the subject's mask. UpscaleError names what is wrong."""
    from ftddm_trt.data.breakpoint import check_acquired_size, load_breakpoint
    from ftddm_trt.data.input_checks import check_subject, kinds_to_read
    from ftddm_trt.data.nifti.files import InputError
    from ftddm_trt.engine.pipeline import consistency_for
    from ftddm_trt.models.model_set import SHIPPED_MODEL_DIR

    if not subject_dir.is_dir():
        raise UpscaleError(f"{subject_dir}: subject folder does not exist")
    try:
        kinds = kinds_to_read(subject_dir, opts.kind)
        subjects = [_read_kind(subject_dir, k, opts) for k in kinds]
        subject = subjects[0]
        subject_spec = consistency_for(spec, opts.data_consistency, subject.fine_mask)
        accept = accept_set(opts)
        accepted, input_notes = check_subject(subject, accept)
        size_accepted, size_notes = check_acquired_size(
            subject_dir, subject.n, load_breakpoint(opts.model or SHIPPED_MODEL_DIR), accept)
        accepted, input_notes = [*accepted, *size_accepted], [*input_notes, *size_notes]
        for other in subjects[1:]:
            if other.metabolites != subject.metabolites:
                raise InputError(
                    subject_dir / "concs",
                    f"concs/{other.kind} holds {', '.join(other.metabolites)} but "
                    f"concs/{subject.kind} holds {', '.join(subject.metabolites)}: restrict with --kind or "
                    "--metabolites",
                )
            check_subject(other, accept)
    except (InputError, ValueError) as err:
        raise UpscaleError(str(err)) from err
    return LoadedSubject(subject_dir, subject, subject_spec, accepted, [*subject.notes, *input_notes], subjects[1:])


def _read_kind(subject_dir: Path, kind: str, opts: UpscaleOptions) -> "SubjectInput":
    """One concentration kind of a subject, checked against --scale and cut to --metabolites."""
    from ftddm_trt.data.nifti.read import read_subject

    subject = read_subject(subject_dir, kind=kind)
    if opts.scale is not None and abs(opts.scale - subject.scale) > 1e-3:
        raise UpscaleError(
            f"--scale {opts.scale} does not match the data: {subject.n}x{subject.n} maps give s = {subject.scale:.3f}"
        )
    if opts.metabolites:
        unknown = [m for m in opts.metabolites if m not in subject.metabolites]
        if unknown:
            raise UpscaleError(f"{subject_dir}: no maps for {', '.join(unknown)} in concs/{kind} "
                               f"(present: {', '.join(subject.metabolites)})")
        subject.select(opts.metabolites)
        subject.missing = ()
    return subject


def report_loaded(loaded: LoadedSubject, prefix: str = "") -> None:
    """Print the metabolites not found, what was accepted about a subject and the notes the checks made
    (stderr console)."""
    if loaded.input.missing:
        console.print(f"[yellow]{prefix}missing[/] no map for {', '.join(loaded.input.missing)} in "
                      f"{loaded.subject_dir / 'concs' / loaded.input.kind}: not written", highlight=False)
    for line in loaded.accepted:
        console.print(f"[yellow]{prefix}accepted[/] {line}", highlight=False)
    for line in loaded.notes[len(loaded.input.notes):]:
        console.print(f"[yellow]{prefix}note[/] {line}", highlight=False)


def n_maps(loaded: LoadedSubject, opts: UpscaleOptions) -> int:
    """Images one subject costs: kinds x slices x metabolites x samples."""
    return int(len(loaded.inputs) * loaded.input.lr.shape[0] * loaded.input.lr.shape[1] * opts.samples)


def correction_decisions(result, spec, qc_weight: float) -> list[str]:
    """One sentence per run-time correction: whether it ran, on how many maps it was kept and why (run.json
    ``corrections``, stderr and the report)."""
    lines = []
    if spec.data_consistency:
        lines.append("data consistency: applied to every map (M is a fine quality mask; the output reproduces "
                     "the acquired k-space band exactly)")
    elif result.qc_consistency_applied:
        lines.append(f"qc consistency (weight {qc_weight:g}): kept on {result.qc_consistency_kept} of "
                     f"{result.qc_consistency_tried} maps, where it agreed better with the acquired k-space band")
    else:
        why = result.condition.qc_mask_note or ("weight 0" if qc_weight <= 0 else "M is not from the acquired grid")
        lines.append(f"qc consistency: not applied ({why})")
    if spec.passes > 1:
        lines.append(f"solver passes {spec.passes}: each pass kept per map only where it agreed at least as well "
                     "with the acquired k-space band")
    if result.condition.y.shape[0] and not spec.data_consistency:
        lines.append("mask M: the acquired maps' own signal, dilated by one acquired voxel (qc maps do not enter M, "
                     "so any qc convention gives the same M)")
    return lines


def upscale_with_backend(
    loaded: LoadedSubject,
    out_dir: Path,
    opts: UpscaleOptions,
    base_spec,
    backend,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    command: str = "upscale",
) -> dict:
    """Super-resolve a subject read by ``load_subject`` on an open ``backend``; write ``out_dir`` atomically.

    ``base_spec``: the spec of ``check_options`` (recorded in the settings fingerprint). ``out_dir`` is
    checked and locked (``atomic.atomic_dir``: OutputError when refused or busy) before sampling.
    ``progress(done, total)`` counts maps. Returns the run record (run.json). Errors propagate (the
    caller decides whether to go on); either way nothing is left at ``out_dir`` or beside it.
    """
    from ftddm_trt.data.figures import report_figure
    from ftddm_trt.data.input_checks import zero_output_channels
    from ftddm_trt.data.nifti.write import write_maps
    from ftddm_trt.engine.pipeline import qc_step_weight
    from ftddm_trt.engine.upscale import upscale_subject

    subject_dir, subject, spec = loaded.subject_dir, loaded.input, loaded.spec
    total = n_maps(loaded, opts)
    per_kind = total // len(loaded.inputs)
    with atomic_dir(
        out_dir, force, upscale_inputs(subject_dir, opts), command=command
    ) as tmp:  # locked: no concurrent writer
        net = fine_mask_net(opts.model)
        qc_weight = qc_step_weight(opts.qc_consistency, net)
        results = {}
        for i, one in enumerate(loaded.inputs):  # each kind alike: FSL-MRS scales every voxel by its own reference
            def tick(done: int, _total: int, offset: int = i * per_kind) -> None:
                if progress is not None:
                    progress(offset + done, total)

            res = upscale_subject(one, backend, spec, batch_size=opts.batch_size, seed=opts.seed,
                                  samples=opts.samples, progress=tick, server_loop=opts.server_loop,
                                  qc_weight=qc_weight, fine_mask_net=net)
            zero = zero_output_channels(one)  # accepted zero maps / empty masks: output zero by definition
            res.maps[:, zero] = 0.0
            if res.sd is not None:
                res.sd[:, zero] = 0.0
            write_maps(
                tmp, res.maps, one.affine_sr, kind=one.kind, sd=res.sd, metabolites=one.metabolites, like=one.header
            )
            results[one.kind] = res
        result = results[subject.kind]
        backend_info = backend.describe()
        record = {
            "ftddm_trt_version": __version__,
            "input": str(subject_dir.resolve()),
            "output": str(out_dir.resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "n": subject.n, "scale": subject.scale, "slices": subject.n_slices,
            "metabolites": list(subject.metabolites), "kind": subject.kind, "kinds": list(results),
            "missing_metabolites": list(subject.missing),
            "inputs": {k: one.sources for k, one in zip(results, loaded.inputs)},
            "mask_source": subject.mask_source, "fine_mask": subject.fine_mask,
            "data_consistency": {"mode": opts.data_consistency, "applied": spec.data_consistency},
            "qc_consistency": {"weight": qc_weight, "applied": result.qc_consistency_applied,
                               "kept_maps": result.qc_consistency_kept, "tried_maps": result.qc_consistency_tried,
                               "fine_mask": result.condition.qc_mask_source if result.qc_consistency_applied else None,
                               "fine_mask_sha256": fine_mask_sha256(opts.model) if net is not None else None,
                               "note": result.condition.qc_mask_note},
            "corrections": correction_decisions(result, spec, qc_weight),
            "anatomy": result.condition.anatomy, "anatomy_coverage": subject.anatomy_coverage,
            "accepted": loaded.accepted, "notes": loaded.notes,
            "sampler": spec.to_dict(), "sampler_choice": resolve_sampler(opts)[1], "nfe": result.nfe,
            "samples": opts.samples, "seed": opts.seed,
            "batch_size": opts.batch_size, "backend": backend_info, "server_loop": opts.server_loop,
            "seconds": sum(r.seconds for r in results.values()), "seconds_per_map": result.seconds_per_slice,
            "timings": result.timings,
            "fingerprint": settings_fingerprint(subject_dir, opts, base_spec, backend_info),
        }
        (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str))
        for line in record["corrections"]:
            console.print(f"[dim]{subject_dir.name}: {line}[/]", highlight=False)
        report_figure(tmp / "report.png", subject.lr, result.maps, subject.metabolites, sd=result.sd,
                      t1=subject.t1, flair=subject.flair,
                      title=f"{subject_dir.name}: {spec.name}, NFE {result.nfe}, s = {subject.scale:.2f}\n"
                            + record["corrections"][0])
    return record


def upscale_to_folder(subject_dir: Path, out_dir: Path, opts: UpscaleOptions, force: bool = False) -> dict:
    """Read, super-resolve, write ``out_dir`` atomically; returns the run record (run.json).

    Raises UpscaleError (or OutputError for ``out_dir``) naming the problem; nothing is written then.
    """
    if not subject_dir.is_dir():
        raise UpscaleError(f"{subject_dir}: subject folder does not exist")
    check_output(out_dir, force, upscale_inputs(subject_dir, opts))
    spec = check_options(opts)
    loaded = load_subject(subject_dir, opts, spec)
    report_loaded(loaded)
    backend = open_upscale_backend(opts, spec)
    try:
        with backend, maps_progress("upscale") as bar:
            task = bar.add_task("maps", total=n_maps(loaded, opts))
            return upscale_with_backend(loaded, out_dir, opts, spec, backend, force=force,
                                        progress=lambda done, total: bar.update(task, completed=done))
    except OutputError:
        raise
    except Exception as err:
        raise UpscaleError(
            f"upscaling {subject_dir} failed, nothing written to {out_dir}: {type(err).__name__}: {err}"
        ) from err
