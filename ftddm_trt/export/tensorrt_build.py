"""Build TensorRT engines from an ONNX export (GPU machines only).

Kept apart from running engines (``engine.tensorrt_backend``), as in TensorRT's demo/Diffusion:

- optimization profile per network: batch min/opt/max chosen for whole-volume batching;
- fp16 where it pays, with normalization, reductions and softmax kept in fp32 (InstanceNorm /
  attention overflow in fp16: REFERENCE.md section 3);
- a timing cache shared across builds;
- an engine cache keyed by ONNX hash + TensorRT version + GPU name + precision + profile, so a
  stale engine is never used.

Everything that decides *what* to build is a pure function, testable without a GPU. The builder
checks for an NVIDIA GPU and for the ``tensorrt`` package before touching any TensorRT runtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ftddm_trt.export.manifest import FLOW_TTRUNC_KEY, manifest_flow_ttrunc, read_manifest, resolve_flow_ttrunc, write_manifest

PRECISIONS = ("fp32", "fp16")

#: TensorRT layer types (``trt.LayerType`` names) kept in fp32 in an fp16 engine.
FP32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY", "ELEMENTWISE_POW"})
#: Name fragments of ONNX nodes (as torch's exporter names them) kept in fp32 as well.
FP32_NAME_HINTS = ("norm", "softmax", "reduce", "sqrt", "pow", "var", "mean", "rsqrt", "exp", "log")


class TensorRTUnavailable(RuntimeError):
    """No NVIDIA GPU or no TensorRT on this machine."""


@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile over the batch dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


def volume_profile(batch_size: int, max_batch: int) -> BatchProfile:
    """Profile for whole-volume batching: the pipeline sends full batches of ``batch_size`` and one
    remainder batch, so opt is the batch size, min 1 and max the export's max batch (at least opt)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return BatchProfile(min=1, opt=batch_size, max=max(batch_size, max_batch))


def keep_fp32(layer_type: str, layer_name: str) -> bool:
    """Whether a layer stays in fp32 inside an fp16 engine."""
    if layer_type in FP32_LAYER_TYPES:
        return True
    lname = layer_name.lower()
    return any(h in lname for h in FP32_NAME_HINTS)


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, precision: str, profile: BatchProfile) -> str:
    """A key that changes whenever the engine would: graph, TensorRT, GPU, precision, profile."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    blob = json.dumps({"onnx": onnx_sha256, "trt": trt_version, "gpu": gpu_name, "precision": precision,
                       "profile": asdict(profile)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_filename(network: str, key: str) -> str:
    return f"{network}-{key[:16]}.plan"


def nvidia_gpu_name() -> str | None:
    """The first NVIDIA GPU's name from nvidia-smi (no CUDA runtime touched), or None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def require_tensorrt() -> str:
    """Return the GPU name, or raise TensorRTUnavailable with what is missing (GPU checked first)."""
    gpu = nvidia_gpu_name()
    if gpu is None:
        raise TensorRTUnavailable("no NVIDIA GPU found (nvidia-smi is missing or lists none): TensorRT engines "
                                  "can only be built and run on a machine with an NVIDIA GPU. Use --backend onnxruntime.")
    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailable(f"found GPU {gpu!r} but the Python package 'tensorrt' is not installed: "
                                  "pip install 'ftddm-trt[tensorrt]' from NVIDIA's index.")
    return gpu


def build_engine(onnx_path: Path, engine_path: Path, profile: BatchProfile, precision: str,
                 timing_cache: Path, workspace_gib: float = 4.0) -> None:
    """Parse ``onnx_path`` and serialize an engine to ``engine_path`` (atomic). Needs a GPU."""
    import tensorrt as trt  # imported only after require_tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            # only float layers: shape arithmetic (int64/bool outputs) cannot be given a float type
            floating = all(layer.get_output(j).dtype in (trt.float32, trt.float16) for j in range(layer.num_outputs))
            if floating and keep_fp32(layer.type.name, layer.name):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        opt_profile.set_shape(tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    tmp = engine_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def engine_flow_ttrunc(onnx_manifest: dict[str, Any], onnx_dir: Path, flow_ttrunc: int | None) -> int | None:
    """The Ttrunc an engine folder records: the export's (``flow_ttrunc`` must agree: TtruncMismatch)."""
    where = f"the ONNX export {onnx_dir}"
    return resolve_flow_ttrunc(manifest_flow_ttrunc(onnx_manifest, where), flow_ttrunc, where)


def build_engines(onnx_dir: Path, out_dir: Path, batch_size: int = 16, precision: str = "fp16",
                  log: Callable[[str], None] = print, flow_ttrunc: int | None = None) -> dict[str, Any]:
    """Build (or reuse from the cache) one engine per ONNX network; write ``out_dir/manifest.json``.

    The export's Ttrunc is checked against ``flow_ttrunc`` before any GPU work and recorded."""
    onnx_manifest = read_manifest(onnx_dir)
    ttrunc = engine_flow_ttrunc(onnx_manifest, Path(onnx_dir), flow_ttrunc)
    gpu = require_tensorrt()
    import tensorrt as trt

    out_dir.mkdir(parents=True, exist_ok=True)
    profile = volume_profile(batch_size, int(onnx_manifest.get("max_batch", 128)))
    engines: dict[str, Any] = {}
    for name, info in onnx_manifest["networks"].items():
        key = engine_cache_key(info["onnx_sha256"], trt.__version__, gpu, precision, profile)
        path = out_dir / engine_filename(name, key)
        if path.is_file():
            log(f"{name}: cached engine {path.name}")
        else:
            log(f"{name}: building {precision} engine (batch {profile.min}/{profile.opt}/{profile.max}) ...")
            build_engine(Path(onnx_dir) / info["onnx"], path, profile, precision, out_dir / "timing.cache")
        engines[name] = {"engine": path.name, "cache_key": key, **{k: info[k] for k in ("inputs", "outputs", "onnx_sha256")}}
    manifest = {FLOW_TTRUNC_KEY: ttrunc, "tensorrt_version": trt.__version__, "gpu": gpu, "precision": precision, "profile": asdict(profile),
                "model_hashes": onnx_manifest.get("model_hashes", {}), "networks": engines}
    write_manifest(out_dir, manifest)
    return manifest
