"""What the benchmarks run: model sets, their exports, a phantom volume, and the backends over them.

- ``random_model_set``: networks of a preset with random weights saved as a model folder (smoke runs
  with ``tiny``; the paper-size UNet);
- ``paper_unet``: the paper-size UNet (random weights) and its ONNX export, made once and cached;
- ``phantom_condition``: one phantom subject written as a user's scan, read back, turned into the
  network condition of all its Z x 7 maps (the whole-volume workload);
- ``open_backends``: the runtimes a benchmark compares, by label; the ones that cannot open here
  (no GPU, no TensorRT) come back with the reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ftddm_trt.engine.backend import Backend
from ftddm_trt.models.model_set import ModelSet

#: Backends a CPU machine runs, in table order.
CPU_BACKENDS: tuple[str, ...] = ("torch-fp32", "torch-bf16", "onnxruntime")
#: Backends added when torch sees a CUDA device (TensorRT also needs the ``tensorrt`` package).
GPU_BACKENDS: tuple[str, ...] = ("torch-cuda-fp32", "torch-cuda-fp16-graph", "tensorrt-fp16")


def _log_nothing(_msg: str) -> None:
    pass


def preset_configs(unet_preset: str, flow_preset: str | None = None):
    """UNet (and flow) configs of a preset at the 64x64 image size (``tiny`` is 16x16 by default)."""
    from ftddm_trt.constants import HR_SIZE
    from ftddm_trt.models import FlowConfig, UNetConfig

    ucfg = UNetConfig.preset(unet_preset).replace(image_size=HR_SIZE)
    fcfg = FlowConfig.preset(flow_preset or unet_preset).replace(image_size=HR_SIZE)
    return ucfg, fcfg


def random_model_set(
    folder: Path | str,
    preset: str = "tiny",
    networks: Sequence[str] = ("unet", "unet_full", "flow"),
    seed: int = 0,
    perturb: float = 0.05,
) -> ModelSet:
    """Save ``networks`` of ``preset`` with random weights into ``folder`` and open it as a model set.

    Every parameter gets ``perturb`` * N(0, 1) added, so that zero-initialised layers (attention
    projections, flow heads) do not make outputs trivially zero."""
    from ftddm_trt.models import ConditionalFlow, DenoisingUNet, save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ucfg, fcfg = preset_configs(preset)
    for i, name in enumerate(networks):
        torch.manual_seed(seed + i)
        if name == "flow":
            net, cfg = ConditionalFlow(fcfg), fcfg
        else:
            net, cfg = DenoisingUNet(ucfg), ucfg
        if perturb:
            gen = torch.Generator().manual_seed(seed + 100 + i)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        save_model(net.eval(), cfg, folder / name)
    return ModelSet.open(folder)


def cached_onnx_export(models: ModelSet, cache_dir: Path | str | None = None,
                       log: Callable[[str], None] = _log_nothing) -> Path:
    """The ONNX export of ``models`` (``export_model_set``, parity-checked), made once and cached under
    ``cache_dir/onnx/<key of the weights' hashes>``; without ``cache_dir`` exactly
    ``engine.factory.onnx_export_for`` (``$FTDDM_TRT_CACHE`` or ~/.cache/ftddm-trt)."""
    from ftddm_trt.engine.factory import onnx_export_for

    if cache_dir is None:
        return onnx_export_for(models, log)
    from ftddm_trt.export.onnx_export import export_model_set

    key = hashlib.sha256("".join(f"{k}={v}" for k, v in sorted(models.hashes().items())).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "onnx" / key
    if not (folder / "manifest.json").is_file():
        log(f"exporting the model to ONNX once (cached in {folder}) ...")
        export_model_set(models, folder, force=True, log=log)
    return folder


@dataclass(frozen=True)
class ExportedUNet:
    """A UNet-only model set and its ONNX export (``onnx_dir`` has ``unet.onnx`` and a manifest)."""

    models: ModelSet
    onnx_dir: Path
    preset: str
    parameters: int
    check: dict[str, Any] = field(default_factory=dict)


def _unet_cache_key(preset: str, seed: int) -> str:
    from ftddm_trt import __version__
    from ftddm_trt.export.onnx_export import OPSET

    ucfg, _ = preset_configs(preset)
    blob = json.dumps({"config": ucfg.to_dict(), "seed": seed, "torch": torch.__version__, "opset": OPSET,
                       "ftddm_trt": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ort_torch_check(models: ModelSet, onnx_dir: Path, batch: int = 2, seed: int = 3) -> dict[str, Any]:
    """max |ONNX Runtime - torch| of the UNet on one random batch (not a parity gate: a sanity check)."""
    import onnxruntime as ort

    from ftddm_trt.export.onnx_export import random_inputs

    net = models.load_torch()["unet"].eval()
    feeds = random_inputs("unet", batch, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = net(*feeds.values()).numpy()
    sess = ort.InferenceSession(str(Path(onnx_dir) / "unet.onnx"), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    err = float(np.max(np.abs(out - ref)))
    return {"batch": batch, "max_abs_error": err, "ref_max_abs": float(np.max(np.abs(ref)))}


def paper_unet(
    cache_dir: Path | str | None = None,
    preset: str = "paper",
    seed: int = 0,
    log: Callable[[str], None] = _log_nothing,
) -> ExportedUNet:
    """The UNet of ``preset`` with random weights, saved and exported to ONNX once under
    ``cache_dir/bench/<preset>-unet-<key>`` (default cache: ``engine.factory.cache_root()``), with a
    manifest that ``OnnxRuntimeBackend`` and ``build_engines`` read. Parity is not gated (the weights
    are random); ``check`` holds max |ORT - torch| on one batch."""
    import onnx

    from ftddm_trt.engine.factory import cache_root
    from ftddm_trt.export.manifest import file_sha256, write_manifest
    from ftddm_trt.export.onnx_export import MAX_BATCH, OPSET, export_network, graph_io
    from ftddm_trt.models import count_parameters

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / "bench" / f"{preset}-unet-{_unet_cache_key(preset, seed)}"
    model_dir, onnx_dir = folder / "model", folder / "onnx"
    if not (onnx_dir / "manifest.json").is_file():
        log(f"building the random {preset} UNet and exporting it to ONNX once (cache {folder}) ...")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            models = random_model_set(tmp / "model", preset, networks=("unet",), seed=seed, perturb=0.02)
            net = models.load_torch()["unet"]
            (tmp / "onnx").mkdir()
            path = tmp / "onnx" / "unet.onnx"
            export_network("unet", net, path)
            hashes = models.hashes()
            write_manifest(
                tmp / "onnx",
                {
                    "opset": OPSET,
                    "max_batch": MAX_BATCH,
                    "torch_version": torch.__version__,
                    "model_dir": str(model_dir),
                    "model_hashes": hashes,
                    "random_weights": {"preset": preset, "seed": seed},
                    "networks": {
                        "unet": {
                            "onnx": path.name,
                            "onnx_sha256": file_sha256(path),
                            "model_sha256": hashes["unet"],
                            "config": models.config("unet"),
                            **graph_io(onnx.load(str(path))),
                        }
                    },
                },
            )
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    models = ModelSet.open(model_dir)
    params = count_parameters(models.load_torch()["unet"])
    return ExportedUNet(models=models, onnx_dir=onnx_dir, preset=preset, parameters=params,
                        check=ort_torch_check(models, onnx_dir))


@dataclass
class VolumeCondition:
    """The network inputs of every map of one phantom volume: y (K,4,64,64), s (K,), K = Z x C."""

    y: torch.Tensor
    s: torch.Tensor
    slices: int
    metabolites: int
    n: int
    subject: str


def phantom_condition(work_dir: Path | str, index: int = 0, n: int = 16, seed: int = 0,
                      max_maps: int | None = None) -> VolumeCondition:
    """Write phantom subject ``index`` as an ``n x n`` scan under ``work_dir`` (``data.nifti.write``), read
    it back as a user's input and build its condition (``engine.upscale.build_condition``).
    ``max_maps``: keep only the first maps (smoke runs)."""
    from ftddm_trt.data.nifti.read import read_subject
    from ftddm_trt.data.nifti.write import write_phantom_subject
    from ftddm_trt.data.phantom import make_subject
    from ftddm_trt.engine.upscale import build_condition

    subject = make_subject(index, seed=seed)
    path = write_phantom_subject(work_dir, subject, n)
    cond = build_condition(read_subject(path))
    z, c = cond.mask.shape[:2]
    y, s = cond.y, cond.s
    if max_maps is not None:
        y, s = y[:max_maps], s[:max_maps]
    return VolumeCondition(y=y.contiguous(), s=s.contiguous(), slices=z, metabolites=c, n=n, subject=subject.subject_id)


def smoke_model_set(cache_dir: Path | str | None, work: Path, log: Callable[[str], None] = _log_nothing) -> ModelSet:
    """Tiny random networks for smoke runs, kept in ``cache_dir/bench/tiny-model`` (else ``work``) and reused,
    so that their cached ONNX export is too (safetensors headers are not byte-stable across saves)."""
    folder = (Path(cache_dir) / "bench" / "tiny-model") if cache_dir is not None else Path(work) / "tiny-model"
    try:
        models = ModelSet.open(folder)
        if set(models.networks) == {"unet", "unet_full", "flow"}:
            return models
    except FileNotFoundError:
        pass
    log(f"building tiny random networks in {folder}")
    return random_model_set(folder, "tiny")


def default_backends(cuda: bool | None = None) -> tuple[str, ...]:
    """CPU backends, plus the GPU ones when torch sees CUDA (``cuda`` overrides the detection)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return CPU_BACKENDS + (GPU_BACKENDS if cuda else ())


def open_backend_by_label(
    label: str,
    models: ModelSet,
    onnx_dir: Path,
    threads: int | None = None,
    engine_dir: Path | None = None,
    engine_batch: int = 16,
    log: Callable[[str], None] = _log_nothing,
) -> Backend:
    """Open one backend. Labels: ``torch-fp32``, ``torch-bf16``, ``onnxruntime``, ``torch-cuda-fp32``,
    ``torch-cuda-fp16-graph`` (autocast fp16 + CUDA graphs), ``tensorrt-fp16`` (engines from
    ``engine_dir``, else built once from ``onnx_dir`` into ``<onnx_dir>/../engines-fp16``)."""
    from ftddm_trt.engine.torch_backend import TorchBackend

    if label == "torch-fp32":
        return TorchBackend(models, "cpu", "fp32")
    if label == "torch-bf16":
        return TorchBackend(models, "cpu", "bf16")
    if label == "onnxruntime":
        from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx_dir, threads=threads)
    if label == "torch-cuda-fp32":
        return TorchBackend(models, "cuda", "fp32")
    if label == "torch-cuda-fp16-graph":
        return TorchBackend(models, "cuda", "fp16", cuda_graph=True)
    if label == "tensorrt-fp16":
        from ftddm_trt.engine.tensorrt_backend import TensorRTBackend
        from ftddm_trt.export.tensorrt_build import build_engines

        if engine_dir is None:
            engine_dir = Path(onnx_dir).parent / f"{Path(onnx_dir).name}-engines-fp16"
            build_engines(Path(onnx_dir), engine_dir, batch_size=engine_batch, precision="fp16", log=log)
        return TensorRTBackend(engine_dir)
    raise ValueError(f"unknown backend label {label!r}; choose from {CPU_BACKENDS + GPU_BACKENDS}")


def open_backends(
    labels: Sequence[str],
    models: ModelSet,
    onnx_dir: Path,
    threads: int | None = None,
    engine_dir: Path | None = None,
    engine_batch: int = 16,
    log: Callable[[str], None] = _log_nothing,
) -> tuple[dict[str, Backend], dict[str, str]]:
    """Open every backend in ``labels``; returns (open backends, {label: why it could not open})."""
    opened: dict[str, Backend] = {}
    skipped: dict[str, str] = {}
    for label in labels:
        try:
            opened[label] = open_backend_by_label(label, models, onnx_dir, threads, engine_dir, engine_batch, log)
        except Exception as err:  # reported in the results: a row that did not run says why
            skipped[label] = f"{type(err).__name__}: {err}"
            log(f"  {label}: skipped ({skipped[label]})")
    return opened, skipped


def close_all(backends: dict[str, Backend]) -> None:
    """Close every backend, ignoring errors (the results are already taken)."""
    for b in backends.values():
        try:
            b.close()
        except Exception:
            pass
