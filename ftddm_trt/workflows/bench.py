"""Quality versus NFE on the phantom test split (paper Table 1, Figs. 5-7): the logic behind `ftddm-trt bench`."""

from __future__ import annotations

from pathlib import Path

from ftddm_trt.workflows.console import console


class BenchError(Exception):
    """The benchmark cannot run (no backend for the model); the message names why."""


def run_quality_bench(out: Path, model: Path | None, backend: str, maps: int, ddpm_maps: int, batch_size: int,
                      include_ddpm: bool, stem: str, clip_x0: tuple[float, float] | None, lambda_min: float | None,
                      tau_d_sweep: tuple[float, ...], s_sweep: tuple[float, ...], seed: int,
                      command: dict) -> dict[str, Path]:
    """Run every sampler on the same test maps at s = 8, 4, 2 for both mask protocols, on one ``backend``
    for the model (and one per extra flow Ttrunc, for TDPM and for the distilled student when the model has
    them; rows for MUNet-FS-cWGAN and Flow Enhancer when it has their networks); write JSON, markdown
    and figures into ``out`` with the model's hashes and ``command`` (the settings as given). Returns the
    written paths."""
    from ftddm_trt.engine.factory import open_backend
    from ftddm_trt.evaluation.quality import paper_methods, run_quality, write_results
    from ftddm_trt.models import count_parameters
    from ftddm_trt.models.model_set import ModelSet, distilled_folder, distilled_steps

    try:
        models = ModelSet.open(model)
        main_ttrunc = models.flow_ttrunc() or 100
        ttruncs = [t for t in (100, 50, 20) if t in (models.flow_ttruncs() or [main_ttrunc])]
        b = open_backend(backend, model=model, log=console.print)
        flow_backends = {
            t: open_backend(backend, model=model, ttrunc=t, log=console.print) for t in ttruncs if t != main_ttrunc
        }
        has_tdpm = (models.root / "tdpm.safetensors").is_file()
        if has_tdpm:
            flow_backends["tdpm"] = open_backend(
                backend, model=model, ttrunc=main_ttrunc, start="tdpm", log=console.print
            )
        try:
            student = distilled_folder(models.root)
        except FileNotFoundError:
            student = None
        if student is not None:
            flow_backends["distilled"] = open_backend(backend, model=student, ttrunc=main_ttrunc, log=console.print)
    except Exception as err:
        raise BenchError(f"cannot open backend {backend!r}: {err}") from err
    params = {name: count_parameters(net) for name, net in models.load_torch().items()}
    if has_tdpm:
        params["tdpm"] = count_parameters(ModelSet.open(model, start="tdpm").load_torch()["flow"])
    else:
        console.print(
            "[yellow]no TDPM row:[/] the model folder has no tdpm.* (train it with `ftddm-trt train --task tdpm`)"
        )
    try:
        methods = paper_methods(include_ddpm=include_ddpm, ftddm_ttruncs=tuple(ttruncs), clip_x0=clip_x0,
                                lambda_min=lambda_min, tdpm=has_tdpm, munet="munet" in params,
                                flow_enhancer="munet" in params and "flow_enhancer" in params,
                                distilled_steps=distilled_steps(student) if student is not None else None)
        results = run_quality(
            b,
            methods,
            n_maps=maps,
            ddpm_maps=ddpm_maps or None,
            batch_size=batch_size,
            seed=seed,
            log=console.print,
            flow_backends=flow_backends,
            tau_d_sweep=tau_d_sweep,
            s_sweep=s_sweep,
        )
    finally:
        for x in (b, *flow_backends.values()):
            x.close()
    results["model"] = {"dir": str(models.root), "hashes": models.hashes(), "manifest": models.manifest()}
    results["command"] = command
    return write_results(results, params, out, stem=stem)
