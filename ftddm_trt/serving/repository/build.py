"""Write a Triton model repository for one flavour from an ONNX export (and an engine folder).

The network files are hard-linked (or copied) from the export and hashed as placed, the configs rendered
(``render``), and the whole repository validated (``validate``) before it is moved into place
(``atomic.atomic_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from ftddm_trt.atomic import atomic_dir
from ftddm_trt.engine.model_check import WEIGHTS_PARAM
from ftddm_trt.engine.triton_backend import FLOW_TTRUNC_PARAM, SAMPLER_MODEL, TRITON_MODELS, encode_ttrunc_param
from ftddm_trt.export.manifest import FLOW_TTRUNC_KEY, manifest_flow_ttrunc, read_manifest, resolve_flow_ttrunc
from ftddm_trt.integrity import verify_file
from ftddm_trt.serving.repository.render import (
    FLAVORS,
    TRITON_REPO_SRC,
    ConfigError,
    RepoOptions,
    manifest_network_io,
    network_config,
    sampler_config,
)
from ftddm_trt.serving.repository.validate import FILES_KEY, REPOSITORY_JSON, validate_repository


def _place(src: Path, dst: Path) -> None:
    """Hard-link (exports are written by rename, so the file never changes under the link) or copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_repository(
    onnx_dir: Path | str,
    out_dir: Path | str,
    flavor: str = "cpu",
    engines_dir: Path | str | None = None,
    options: RepoOptions = RepoOptions(),
    force: bool = False,
    log: Callable[[str], None] = print,
    flow_ttrunc: int | None = None,
) -> dict[str, Any]:
    """Write a Triton model repository for ``flavor`` into ``out_dir`` (atomic; refuses a non-empty
    folder without ``force``). Returns what ``repository.json`` records.

    The flow's Ttrunc (from the export's manifest; ``flow_ttrunc`` must agree with it, TtruncMismatch
    otherwise, or supplies it when the export has none) goes into repository.json and into the
    ``flow_ttrunc`` parameter of ftddm_flow and ftddm_sampler, where clients and the server loop read it."""
    if flavor not in FLAVORS:
        raise ConfigError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if engines_dir is not None and flavor == "cpu":
        raise ConfigError("TensorRT engines only go into a gpu-flavour repository (--flavor gpu or gpu-python)")
    if engines_dir is None and flavor == "gpu-python":
        raise ConfigError(
            "the gpu-python flavour runs TensorRT engines: give --engines (from `ftddm-trt build-engine`)"
        )
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = read_manifest(onnx_dir)
    networks = [n for n in TRITON_MODELS if n in manifest.get("networks", {})]
    if not networks:
        raise ConfigError(f"the export {onnx_dir} lists no network in its manifest")
    ttrunc = resolve_flow_ttrunc(manifest_flow_ttrunc(manifest, f"the ONNX export {onnx_dir}"), flow_ttrunc,
                                 f"the ONNX export {onnx_dir}")
    engines = read_manifest(Path(engines_dir)) if engines_dir is not None else None
    if engines is not None:
        resolve_flow_ttrunc(manifest_flow_ttrunc(engines, f"the engine folder {engines_dir}"), ttrunc,
                            f"the engine folder {engines_dir}")
        prof_max = int(engines.get("profile", {}).get("max", 0))
        if prof_max and options.max_batch_size > prof_max:
            raise ConfigError(f"max_batch_size {options.max_batch_size} exceeds the engines' profile max {prof_max}")
        for n in networks:
            info = engines.get("networks", {}).get(n)
            if info is None:
                raise ConfigError(f"the engine folder {engines_dir} has no engine for {n}")
            if info.get("onnx_sha256") != manifest["networks"][n].get("onnx_sha256"):
                raise ConfigError(
                    f"the {n} engine in {engines_dir} was built from another ONNX file than {onnx_dir}: rebuild it"
                )
    max_export = int(manifest.get("max_batch", options.max_batch_size))
    if options.max_batch_size > max_export:
        raise ConfigError(
            f"max_batch_size {options.max_batch_size} exceeds the export's dynamic batch max {max_export}"
        )
    with atomic_dir(Path(out_dir), force=force, inputs=(onnx_dir, engines_dir), command="triton-repo") as tmp:
        files: dict[str, dict[str, str]] = {}
        platform = (
            None
            if flavor in ("cpu", "gpu-python")
            else ("tensorrt_plan" if engines is not None else "onnxruntime_onnx")
        )
        for n in networks:
            ins, outs = manifest_network_io(manifest, n)
            info = manifest["networks"][n]
            model_dir = tmp / TRITON_MODELS[n]
            params = {
                "network": n,
                "onnx_sha256": info.get("onnx_sha256", ""),
                WEIGHTS_PARAM: info.get("model_sha256", ""),
            }
            if n == "flow":
                params[FLOW_TTRUNC_PARAM] = encode_ttrunc_param(ttrunc)
            if flavor == "gpu-python":  # the model hashes its engine at load (tensorrt_network.py)
                params["engine_sha256"] = engines["networks"][n]["engine_sha256"]
            text = network_config(n, flavor, ins, outs, options, platform, params)
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(text)
            if platform == "tensorrt_plan" or flavor == "gpu-python":
                placed, expected = "1/model.plan", engines["networks"][n]["engine_sha256"]
                _place(Path(engines_dir) / engines["networks"][n]["engine"], model_dir / placed)
            else:
                placed, expected = "1/model.onnx", info.get("onnx_sha256")
                _place(onnx_dir / info["onnx"], model_dir / placed)
            # the placed file must be the one its manifest hashed (IntegrityError otherwise); recorded for the launcher
            files[TRITON_MODELS[n]] = {
                "file": placed,
                "sha256": verify_file(model_dir / placed, expected, what=f"{n} network"),
            }
            if flavor == "cpu":
                shutil.copy2(TRITON_REPO_SRC / "python" / "onnx_network.py", model_dir / "1" / "model.py")
            elif flavor == "gpu-python":
                shutil.copy2(TRITON_REPO_SRC / "python" / "tensorrt_network.py", model_dir / "1" / "model.py")
            runtime = "python + tensorrt" if flavor == "gpu-python" else "python + onnxruntime"
            log(f"{TRITON_MODELS[n]}: {platform or runtime}")
        if options.sampler:
            ins, outs = manifest_network_io(manifest, networks[0])
            img = next(t.dims for t in outs)
            cond = next(t.dims for t in ins if t.name == "y")
            model_dir = tmp / SAMPLER_MODEL
            (model_dir / "1").mkdir(parents=True)
            weights = {n: manifest["networks"][n].get("model_sha256", "") for n in networks}
            (model_dir / "config.pbtxt").write_text(
                sampler_config({n: TRITON_MODELS[n] for n in networks}, options, img, cond, ttrunc, weights)
            )
            shutil.copy2(TRITON_REPO_SRC / "python" / "sampler.py", model_dir / "1" / "model.py")
            log(f"{SAMPLER_MODEL}: python (BLS to {', '.join(TRITON_MODELS[n] for n in networks)})")
        meta = {
            "flavor": flavor,
            FILES_KEY: files,
            FLOW_TTRUNC_KEY: ttrunc if "flow" in networks else None,
            "options": asdict(options),
            "onnx_dir": str(onnx_dir.resolve()),
            "engines_dir": str(Path(engines_dir).resolve()) if engines_dir is not None else None,
            "models": [TRITON_MODELS[n] for n in networks] + ([SAMPLER_MODEL] if options.sampler else []),
            "export_manifest": manifest,
        }
        (tmp / REPOSITORY_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
        validate_repository(tmp, flavor, manifest)
    return meta

