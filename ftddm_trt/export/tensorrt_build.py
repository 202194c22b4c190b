"""Build TensorRT engines from an ONNX export (GPU machines only), for TensorRT 10 and 11.

Kept apart from running engines (``engine.tensorrt_backend``), as in TensorRT's demo/Diffusion:

- optimization profile per network: batch min/opt/max chosen for whole-volume batching;
- a **strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; always on and the
  flag ignored in TensorRT 11, which has no ``BuilderFlag.FP16`` nor per-layer precision): fp16 comes
  from explicit casts in the ONNX graph (``export.fp16``: UNets converted with the t/s embeddings,
  normalization, softmax and the sensitive ops kept in fp32; the flow, one evaluation per sample,
  stays fp32);
- a build-time check of every engine against ONNX Runtime fp32 on real inputs: an engine outside
  tolerance (``check_precision``) is refused and not written;
- a timing cache shared by the networks of a build (a foreign or corrupt one is ignored, the file
  replaced atomically);
- engines keyed by the bytes of the ONNX file the parser reads + the precision policy + the build
  options + TensorRT version + GPU name + profile: an engine folder is reused only when it holds
  exactly this build (and the export's Ttrunc), its files verified against their sha256; any other
  build goes into a new folder written atomically (``atomic.atomic_dir``), so a stale engine is never used.

Everything that decides *what* to build is a pure function, testable without a GPU. The builder
checks for a CUDA device (the one torch sees) and for the ``tensorrt`` package before touching any
TensorRT runtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ftddm_trt.atomic import atomic_dir, atomic_file, write_bytes_atomic
from ftddm_trt.export.manifest import (
    FLOW_TTRUNC_KEY,
    file_sha256,
    manifest_flow_ttrunc,
    read_manifest,
    require_fp32_export,
    resolve_flow_ttrunc,
    write_manifest,
)
from ftddm_trt.integrity import verify_networks

PRECISIONS = ("fp32", "fp16")
#: Networks converted to fp16 in an fp16 build; the flow (1 of 21..101 evaluations) stays fp32.
FP16_NETWORKS: tuple[str, ...] = ("unet", "unet_full")
#: Supported TensorRT major versions (the ``tensorrt`` extra is bounded to these).
TENSORRT_MAJORS: tuple[int, ...] = (10, 11)


class TensorRTUnavailable(RuntimeError):
    """No CUDA GPU or no (supported) TensorRT on this machine."""


class PrecisionError(RuntimeError):
    """An engine's outputs differ from ONNX Runtime fp32 beyond the tolerance: it is not used."""


@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile over the batch dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class Tolerance:
    """An engine passes when ``max |engine - ref| <= atol + rtol * max |ref|`` and every value is finite."""

    atol: float
    rtol: float


#: fp32 engines may use TF32 matmuls/convolutions (TensorRT's default); fp16 UNets keep embeddings and
#: norms in fp32 (measured on the tiny export with ONNX Runtime CPU: max |fp16 - fp32| = 2.3e-3 at scale 1.4).
TOLERANCES: dict[str, Tolerance] = {"fp32": Tolerance(atol=5e-3, rtol=5e-3), "fp16": Tolerance(atol=2e-2, rtol=2e-2)}


def volume_profile(batch_size: int, max_batch: int) -> BatchProfile:
    """Profile for whole-volume batching: the pipeline sends full batches of ``batch_size`` and one
    remainder batch, so opt is the batch size, min 1 and max the export's max batch (at least opt)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return BatchProfile(min=1, opt=batch_size, max=max(batch_size, max_batch))


def precision_policy(precision: str) -> dict[str, Any]:
    """What an engine of ``precision`` computes in fp16 and what stays fp32 (part of the cache key)."""
    from ftddm_trt.export import fp16

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return {"precision": "fp32"}
    return {"precision": "fp16", "fp16_networks": list(FP16_NETWORKS), "scalar_inputs": list(fp16.SCALAR_INPUTS),
            "embedding_stop_ops": sorted(fp16.EMBEDDING_STOP_OPS), "fp32_op_types": sorted(fp16.FP32_OP_TYPES),
            "tolerance": asdict(TOLERANCES["fp16"])}


def network_is_fp16(network: str, precision: str) -> bool:
    """True when ``network`` is built in fp16 under ``precision`` (the UNets; the flow stays fp32)."""
    return precision == "fp16" and network in FP16_NETWORKS


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, precision: str, profile: BatchProfile,
                     build_options: dict[str, Any] | None = None) -> str:
    """A key that changes whenever the engine would: the bytes of the ONNX file the parser reads
    (``onnx_sha256``), TensorRT, GPU, precision policy, profile and build options."""
    blob = json.dumps({"onnx": onnx_sha256, "trt": trt_version, "gpu": gpu_name, "policy": precision_policy(precision),
                       "profile": asdict(profile), "options": build_options or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_filename(network: str, key: str) -> str:
    """The file name of ``network``'s engine: ``NETWORK-<first 16 hex digits of its cache key>.plan``."""
    return f"{network}-{key[:16]}.plan"


def check_precision(network: str, reference: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict[str, float]:
    """Compare an engine's output with the fp32 reference; PrecisionError (naming the network) when it
    is not finite, has another shape, or ``max |got - ref| > atol + rtol * max |ref|``.
    Returns ``{"max_abs_error", "limit", "ref_scale"}``."""
    ref, out = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    if ref.shape != out.shape:
        raise PrecisionError(f"{network}: engine output shape {out.shape} != reference {ref.shape}")
    if not np.isfinite(out).all():
        raise PrecisionError(f"{network}: the engine produced {int((~np.isfinite(out)).sum())} non-finite values")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = float(np.abs(out - ref).max()) if ref.size else 0.0
    limit = tol.atol + tol.rtol * scale
    if err > limit:
        raise PrecisionError(f"{network}: engine differs from ONNX Runtime fp32 by {err:.3g} > {limit:.3g} "
                             f"(atol {tol.atol:g} + rtol {tol.rtol:g} x {scale:.3g}); engine refused")
    return {"max_abs_error": err, "limit": limit, "ref_scale": scale}


def cuda_device_name() -> str | None:
    """The name of the CUDA device torch sees (current device; honours CUDA_VISIBLE_DEVICES), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def tensorrt_major(version: str) -> int:
    """Major version of a TensorRT version string; TensorRTUnavailable for a major this build does not support."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError as err:
        raise TensorRTUnavailable(f"cannot read the TensorRT version {version!r}") from err
    if major not in TENSORRT_MAJORS:
        raise TensorRTUnavailable(f"TensorRT {version} is not supported (supported majors: "
                                  f"{', '.join(map(str, TENSORRT_MAJORS))}): pip install 'ftddm-trt[tensorrt]'")
    return major


def require_tensorrt() -> str:
    """Return the GPU name, or raise TensorRTUnavailable with what is missing (GPU checked first)."""
    gpu = cuda_device_name()
    if gpu is None:
        raise TensorRTUnavailable("no NVIDIA GPU found (torch sees no CUDA device): TensorRT engines can only be built "
                                  "and run on a machine with an NVIDIA GPU. Use --backend onnxruntime.")
    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailable(f"found GPU {gpu!r} but the Python package 'tensorrt' is not installed: "
                                  "pip install 'ftddm-trt[tensorrt]' from NVIDIA's index.")
    return gpu


def network_flags(trt) -> int:
    """``create_network`` flags: strongly typed (TensorRT 10; in 11 the flag is deprecated and ignored
    because networks are always strongly typed, so it is set only while it exists)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, engine_path: Path, profile: BatchProfile, timing_cache: Path,
                 workspace_gib: float = 4.0, log: Callable[[str], None] = print) -> None:
    """Parse ``onnx_path`` into a strongly typed network and serialize an engine to ``engine_path``
    (atomic). The graph's own casts decide the precision. Needs a GPU and TensorRT 10 or 11."""
    import tensorrt as trt  # imported only after require_tensorrt()

    tensorrt_major(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"timing cache {timing_cache} is from another TensorRT or GPU (or damaged): starting a fresh one")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise RuntimeError("TensorRT could not attach an empty timing cache")
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        opt_profile.set_shape(tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    write_bytes_atomic(engine_path, bytes(serialized))
    write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))


class EngineRunner:
    """One deserialized engine with its execution context; runs on its own (non-default) CUDA stream.

    ``__call__(feeds, output)`` binds torch CUDA float32 tensors by address (``set_tensor_address``),
    checks every ``set_input_shape``, enqueues ``execute_async_v3`` on the runner's stream (ordered after
    the producer's stream and before the consumer's) and returns the output tensor."""

    def __init__(self, runtime, path: Path) -> None:
        import torch

        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.path = Path(path)

    def __call__(self, feeds: dict[str, Any], output: str):
        """Run the engine on ``feeds`` (name -> CUDA float32 tensor) and return the tensor ``output``."""
        import torch

        producer = torch.cuda.current_stream()
        for name, tensor in feeds.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"{self.path.name}: input {name} of shape {tuple(tensor.shape)} is outside the "
                                   "engine's optimization profile (rebuild with a larger --batch-size / max batch)")
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(output)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(output, out.data_ptr())
        self.stream.wait_stream(producer)
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.path.name}: TensorRT execution failed")
        for tensor in (*feeds.values(), out):
            tensor.record_stream(self.stream)
        producer.wait_stream(self.stream)
        return out


def _verify_engine(name: str, engine_path: Path, onnx_fp32: Path, precision: str) -> dict[str, float]:
    """Run the new engine and ONNX Runtime fp32 on the export's real parity inputs; check_precision."""
    import onnxruntime as ort
    import tensorrt as trt
    import torch

    from ftddm_trt.export.onnx_export import NETWORK_IO, real_parity_inputs

    runner = EngineRunner(trt.Runtime(trt.Logger(trt.Logger.WARNING)), engine_path)
    sess = ort.InferenceSession(str(onnx_fp32), providers=["CPUExecutionProvider"])
    output = NETWORK_IO[name][1][0].name
    worst: dict[str, float] = {}
    for feeds in real_parity_inputs(name):
        ref = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        got = runner({k: v.to("cuda", torch.float32).contiguous() for k, v in feeds.items()}, output)
        torch.cuda.synchronize()
        res = check_precision(name, ref, got.cpu().numpy(), TOLERANCES[precision])
        if res["max_abs_error"] >= worst.get("max_abs_error", -1.0):
            worst = res
    return worst


def engine_flow_ttrunc(onnx_manifest: dict[str, Any], onnx_dir: Path, flow_ttrunc: int | None) -> int | None:
    """The Ttrunc an engine folder records: the export's (``flow_ttrunc`` must agree: TtruncMismatch)."""
    where = f"the ONNX export {onnx_dir}"
    return resolve_flow_ttrunc(manifest_flow_ttrunc(onnx_manifest, where), flow_ttrunc, where)


def prepare_onnx(name: str, src: Path, out_dir: Path, precision: str) -> Path:
    """The ONNX file the parser reads: the export's, or for an fp16 network its fp16 conversion
    (written once beside the engines as ``NAME.fp16.onnx``, atomically)."""
    if not network_is_fp16(name, precision):
        return src
    import onnx

    from ftddm_trt.export.fp16 import convert_fp16

    dst = out_dir / f"{name}.fp16.onnx"
    converted, _ = convert_fp16(onnx.load(str(src)))
    write_bytes_atomic(dst, converted.SerializeToString())
    return dst


def build_options(workspace_gib: float = 4.0) -> dict[str, Any]:
    """The builder settings that change an engine (part of its cache key and of the manifest)."""
    return {"workspace_gib": workspace_gib, "strongly_typed": True, "verified_against": "onnxruntime-fp32"}


def build_engines(onnx_dir: Path, out_dir: Path, batch_size: int = 16, precision: str = "fp16",
                  log: Callable[[str], None] = print, flow_ttrunc: int | None = None,
                  workspace_gib: float = 4.0) -> dict[str, Any]:
    """Build one engine per ONNX network into a new ``out_dir``; write ``out_dir/manifest.json``.

    The export's Ttrunc is checked against ``flow_ttrunc`` before any GPU work and recorded. An
    ``out_dir`` that already holds exactly this build (engines verified against their sha256) is
    reused; otherwise it is written through ``atomic.atomic_dir`` (a non-empty folder is refused,
    nothing appears unless every engine was built and checked). Each new engine is compared with
    ONNX Runtime fp32 on real inputs and refused (PrecisionError) outside ``TOLERANCES[precision]``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    onnx_manifest = read_manifest(onnx_dir)
    require_fp32_export(onnx_manifest, onnx_dir, "build-engine")  # UnsupportedPrecision before any GPU work
    ttrunc = engine_flow_ttrunc(onnx_manifest, onnx_dir, flow_ttrunc)
    gpu = require_tensorrt()
    import tensorrt as trt

    tensorrt_major(trt.__version__)
    reused = same_build(out_dir, onnx_manifest, gpu, trt.__version__, batch_size, precision, ttrunc, workspace_gib)
    if reused is not None:
        for name, info in reused["networks"].items():
            log(f"{name}: cached engine {info['engine']} (same ONNX, GPU, TensorRT, precision, profile and Ttrunc)")
        return reused
    with atomic_dir(out_dir, force=False, inputs=(onnx_dir,), command="build-engine") as tmp:
        return _build_into(onnx_dir, tmp, onnx_manifest, gpu, batch_size, precision, log, ttrunc, workspace_gib)


def same_build(out_dir: Path, onnx_manifest: dict[str, Any], gpu: str, trt_version: str, batch_size: int,
                precision: str, flow_ttrunc: int | None = None, workspace_gib: float = 4.0) -> dict[str, Any] | None:
    """The manifest of ``out_dir`` if it already holds exactly this build (engines and fp16 graphs
    verified against their sha256: IntegrityError if altered), else None."""
    try:
        manifest = read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    profile = volume_profile(batch_size, int(onnx_manifest.get("max_batch", 128)))
    if (manifest.get("gpu"), manifest.get("tensorrt_version"), manifest.get("precision"), manifest.get("profile"),
            manifest.get(FLOW_TTRUNC_KEY)) != (gpu, trt_version, precision, asdict(profile), flow_ttrunc):
        return None
    nets = manifest.get("networks", {})
    if set(nets) != set(onnx_manifest["networks"]):
        return None
    options = build_options(workspace_gib)
    fp16_graphs = []
    for name, info in onnx_manifest["networks"].items():
        if network_is_fp16(name, precision):  # the parser read the fp16 conversion recorded beside the engines
            if nets[name].get("onnx_sha256") != info["onnx_sha256"] or not nets[name].get("parsed_onnx_sha256"):
                return None
            parsed_sha = nets[name]["parsed_onnx_sha256"]
            fp16_graphs.append(name)
        else:
            parsed_sha = info["onnx_sha256"]
        if nets[name].get("cache_key") != engine_cache_key(parsed_sha, trt_version, gpu, precision, profile, options):
            return None
    verify_networks(out_dir, manifest, list(nets), key="engine_sha256", file_key="engine")  # IntegrityError if altered
    verify_networks(out_dir, manifest, fp16_graphs, key="parsed_onnx_sha256", file_key="parsed_onnx")
    return manifest


def _build_into(onnx_dir: Path, out_dir: Path, onnx_manifest: dict[str, Any], gpu: str, batch_size: int,
                precision: str, log: Callable[[str], None], ttrunc: int | None, workspace_gib: float) -> dict[str, Any]:
    """Build every engine into the (staging) folder ``out_dir``; the export is verified first."""
    import tensorrt as trt

    verify_networks(onnx_dir, onnx_manifest, list(onnx_manifest["networks"]))  # IntegrityError before building
    profile = volume_profile(batch_size, int(onnx_manifest.get("max_batch", 128)))
    options = build_options(workspace_gib)
    engines: dict[str, Any] = {}
    for name, info in onnx_manifest["networks"].items():
        src = onnx_dir / info["onnx"]
        parsed = prepare_onnx(name, src, out_dir, precision)
        parsed_sha = file_sha256(parsed)
        key = engine_cache_key(parsed_sha, trt.__version__, gpu, precision, profile, options)
        path = out_dir / engine_filename(name, key)
        record = {
            "engine": path.name,
            "cache_key": key,
            "parsed_onnx": parsed.name,
            "parsed_onnx_sha256": parsed_sha,
            "fp16": network_is_fp16(name, precision),
            **{k: info[k] for k in ("inputs", "outputs", "onnx_sha256")},
        }
        log(
            f"{name}: building {'fp16' if record['fp16'] else 'fp32'} engine (batch "
            f"{profile.min}/{profile.opt}/{profile.max}) ..."
        )
        with atomic_file(path) as tmp:  # an engine refused by the check (PrecisionError) is never written
            build_engine(parsed, tmp, profile, out_dir / "timing.cache", workspace_gib, log)
            record["check"] = _verify_engine(name, tmp, src, precision)
        record["engine_sha256"] = file_sha256(path)
        log(
            f"  {name}: max |engine - ORT fp32| = {record['check']['max_abs_error']:.2e} (limit "
            f"{record['check']['limit']:.2e})"
        )
        engines[name] = record
    manifest = {FLOW_TTRUNC_KEY: ttrunc, "tensorrt_version": trt.__version__, "gpu": gpu, "precision": precision,
                "policy": precision_policy(precision), "build_options": options, "profile": asdict(profile),
                "model_hashes": onnx_manifest.get("model_hashes", {}), "networks": engines}
    write_manifest(out_dir, manifest)
    return manifest
