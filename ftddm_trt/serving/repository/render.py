"""The config.pbtxt text of each model of a Triton repository, from the templates shipped in the package.

Config text comes from the templates in ``serving/triton_templates/templates``; ``RepoOptions`` holds the
serving knobs written into them and ``TensorIO`` one model tensor as Triton sees it (dims without the batch).
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ftddm_trt.engine.model_check import WEIGHTS_PARAM
from ftddm_trt.engine.triton_backend import FLOW_TTRUNC_PARAM, SAMPLER_MODEL, TRITON_MODELS, encode_ttrunc_param

FLAVORS = ("cpu", "gpu", "gpu-python")
#: Where the ONNX Runtime TensorRT accelerator of the gpu flavour caches its engines (inside the server).
DEFAULT_TRT_CACHE_PATH = "/tmp/ftddm-trt-engine-cache"


def triton_templates_dir() -> Path:
    """The Triton templates and Python-backend model code: ``$FTDDM_TRITON_REPO_SRC`` if set, else the
    copy shipped inside the package (``ftddm_trt/serving/triton_templates``, package data of the wheel)."""
    return Path(os.environ.get("FTDDM_TRITON_REPO_SRC", Path(__file__).resolve().parents[1] / "triton_templates"))


#: Source of the config templates and of the Python-backend model code (source only; never generated into).
TRITON_REPO_SRC = triton_templates_dir()
GPU_PLATFORMS = ("tensorrt_plan", "onnxruntime_onnx")
TRT_PRECISIONS = ("FP32", "FP16")
_DTYPES = {"float32": "TYPE_FP32", "int32": "TYPE_INT32"}


class ConfigError(ValueError):
    """A config.pbtxt (or a whole repository) that Triton would reject or that does not fit the export."""


@dataclass(frozen=True)
class RepoOptions:
    """Serving knobs written into the configs.

    max_batch_size: largest batch a model takes (the sampler's too); max_queue_delay_us: how long the
    dynamic batcher waits to merge concurrent requests; preferred_batch_sizes: batches the batcher
    aims for (each <= max_batch_size); instances: model instances per network (KIND_CPU for cpu,
    KIND_GPU for gpu); sampler_instances: concurrent sampling loops; intra_op_threads: ONNX Runtime
    threads per cpu network instance (0: its default); trt_precision / trt_workspace_bytes: the
    TensorRT accelerator of the gpu flavour without engines (FP32 by default: InstanceNorm and
    attention drift in fp16; engines from build-engine keep those in fp32);
    dynamic_batching: False leaves the batcher out of the network configs (each request runs alone).
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 200
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    sampler_instances: int = 2
    intra_op_threads: int = 0
    trt_precision: str = "FP32"
    trt_workspace_bytes: int = 1 << 30
    trt_cache_path: str = DEFAULT_TRT_CACHE_PATH
    sampler: bool = True
    dynamic_batching: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(f"preferred batch sizes {bad} are outside 1..max_batch_size={self.max_batch_size}")
        if self.instances < 1 or self.sampler_instances < 1:
            raise ConfigError("instances and sampler_instances must be >= 1")
        if self.trt_precision not in TRT_PRECISIONS:
            raise ConfigError(f"trt_precision must be one of {TRT_PRECISIONS}, got {self.trt_precision!r}")


@dataclass(frozen=True)
class TensorIO:
    """One model tensor as Triton sees it: dims without the batch; scalar-per-item ones get reshape []."""

    name: str
    dims: tuple[int, ...]
    data_type: str = "TYPE_FP32"
    scalar: bool = False  # graph shape (B,): dims [1] + reshape { shape: [ ] }

    @classmethod
    def from_graph(cls, spec: Mapping[str, Any]) -> "TensorIO":
        """From an export manifest entry ``{"name", "shape": ["batch", ...], "dtype"}``."""
        shape = list(spec["shape"])[1:]
        if any(not isinstance(d, int) or d < 1 for d in shape):
            raise ConfigError(
                f"tensor {spec['name']}: only the batch dimension may be dynamic, got shape {spec['shape']}"
            )
        dtype = _DTYPES.get(str(spec.get("dtype", "float32")))
        if dtype is None:
            raise ConfigError(f"tensor {spec['name']}: unsupported dtype {spec.get('dtype')}")
        return cls(spec["name"], tuple(shape) or (1,), dtype, scalar=not shape)

    def pbtxt(self) -> str:
        """The tensor's entry of a config.pbtxt ``input`` / ``output`` list."""
        dims = ", ".join(str(d) for d in self.dims)
        reshape = "\n    reshape: { shape: [ ] }" if self.scalar else ""
        return f'  {{\n    name: "{self.name}"\n    data_type: {self.data_type}\n    dims: [ {dims} ]{reshape}\n  }}'


# -- expected tensors ------------------------------------------------------------------------------
def default_network_io(network: str) -> tuple[list[TensorIO], list[TensorIO]]:
    """The tensors of a network as ``export.onnx_export`` writes them (used without a manifest)."""
    from ftddm_trt.export.onnx_export import NETWORK_IO

    inputs, outputs = NETWORK_IO[network]
    conv = lambda sp: TensorIO.from_graph({"name": sp.name, "shape": ["batch", *sp.shape], "dtype": "float32"})  # noqa: E731
    return [conv(s) for s in inputs], [conv(s) for s in outputs]


def manifest_network_io(manifest: Mapping[str, Any], network: str) -> tuple[list[TensorIO], list[TensorIO]]:
    """The tensors of ``network`` as the export manifest records its graph."""
    try:
        info = manifest["networks"][network]
        return [TensorIO.from_graph(s) for s in info["inputs"]], [TensorIO.from_graph(s) for s in info["outputs"]]
    except KeyError as err:
        raise ConfigError(f"the export manifest has no inputs/outputs for network {network!r} ({err})") from err


def sampler_io(
    image: tuple[int, ...] = (1, 64, 64), cond: tuple[int, ...] = (4, 64, 64)
) -> tuple[list[TensorIO], list[TensorIO]]:
    """The sampler's tensors: inputs ``y`` ``cond`` and ``s`` (one scalar per item), outputs ``x0`` ``image``
    and ``nfe`` (int32)."""
    return ([TensorIO("y", cond), TensorIO("s", (1,), scalar=True)],
            [TensorIO("x0", image), TensorIO("nfe", (1,), "TYPE_INT32")])


def profile_shapes(inputs: list[TensorIO], options: RepoOptions) -> dict[str, str]:
    """ONNX Runtime TensorRT profile shapes ``{"min"|"opt"|"max": "x_t:1x1x64x64,...,t:1"}`` over the batch:
    min 1, opt the largest preferred batch size (else half the max), max ``max_batch_size``. Per-item
    scalars are (B,) in the graph."""
    opt = max(options.preferred_batch_sizes) if options.preferred_batch_sizes else max(1, options.max_batch_size // 2)

    def shape(b: int) -> str:
        return ",".join(f"{t.name}:" + "x".join(str(d) for d in ((b,) if t.scalar else (b, *t.dims))) for t in inputs)

    return {"min": shape(1), "opt": shape(opt), "max": shape(options.max_batch_size)}


# -- config text -----------------------------------------------------------------------------------
def _template(name: str) -> string.Template:
    path = TRITON_REPO_SRC / "templates" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"config template {path} is missing (set FTDDM_TRITON_REPO_SRC to the triton_templates/ "
            "folder of an ftddm-trt source checkout)"
        )
    return string.Template(path.read_text())


def _params(params: Mapping[str, str]) -> str:
    return ",\n".join(
        f'  {{\n    key: "{k}"\n    value: {{ string_value: {json.dumps(str(v))} }}\n  }}' for k, v in params.items()
    )


def network_config(
    network: str,
    flavor: str,
    inputs: list[TensorIO],
    outputs: list[TensorIO],
    options: RepoOptions = RepoOptions(),
    platform: str | None = None,
    params: Mapping[str, str] | None = None,
) -> str:
    """config.pbtxt text of one network model. ``platform`` (gpu only): tensorrt_plan or onnxruntime_onnx."""
    if flavor not in FLAVORS:
        raise ConfigError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if flavor == "cpu":
        runtime, kind = 'backend: "python"', "KIND_CPU"
        params = {"onnx_file": "model.onnx", "intra_op_threads": str(options.intra_op_threads), **(params or {})}
        optimization = ""
    elif flavor == "gpu-python":
        runtime, kind = 'backend: "python"', "KIND_GPU"
        params = {"engine_file": "model.plan", **(params or {"network": network})}
        optimization = ""
    else:
        platform = platform or "onnxruntime_onnx"
        if platform not in GPU_PLATFORMS:
            raise ConfigError(f"gpu platform must be one of {GPU_PLATFORMS}, got {platform!r}")
        runtime, kind = f'platform: "{platform}"', "KIND_GPU"
        params = dict(params or {"network": network})
        optimization = ""
        if platform == "onnxruntime_onnx":
            optimization = (
                "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ {\n"
                '      name : "tensorrt"\n'
                f'      parameters {{ key: "precision_mode" value: "{options.trt_precision}" }}\n'
                f'      parameters {{ key: "max_workspace_size_bytes" value: "{options.trt_workspace_bytes}" }}\n'
                '      parameters { key: "trt_engine_cache_enable" value: "1" }\n'
                f'      parameters {{ key: "trt_engine_cache_path" '
                f'value: "{options.trt_cache_path}/{TRITON_MODELS[network]}" }}\n'
                + "".join(
                    f'      parameters {{ key: "trt_profile_{k}_shapes" value: "{v}" }}\n'
                    for k, v in profile_shapes(inputs, options).items()
                )
                + "    } ]\n  }\n}\n"
            )
    batching = ""
    if options.dynamic_batching:
        preferred = ""
        if options.preferred_batch_sizes:
            preferred = f"  preferred_batch_size: [ {', '.join(str(b) for b in options.preferred_batch_sizes)} ]\n"
        batching = f"dynamic_batching {{\n{preferred}  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
    return _template("network.pbtxt.in").substitute(
        model_name=TRITON_MODELS[network], network=network, flavor=flavor, runtime=runtime,
        max_batch_size=options.max_batch_size, inputs=",\n".join(t.pbtxt() for t in inputs),
        outputs=",\n".join(t.pbtxt() for t in outputs), instances=options.instances, instance_kind=kind,
        dynamic_batching=batching, optimization=optimization,
        parameters=_params(params),
    )


def sampler_config(networks: Mapping[str, str], options: RepoOptions = RepoOptions(),
                   image: tuple[int, ...] = (1, 64, 64), cond: tuple[int, ...] = (4, 64, 64),
                   flow_ttrunc: int | None = None, weights: Mapping[str, str] | None = None) -> str:
    """config.pbtxt text of ftddm_sampler. ``networks``: network -> Triton model name it calls;
    ``flow_ttrunc``: the Ttrunc the flow was trained for (the sampler refuses requests for another);
    ``weights``: network -> sha256 of the weights it was made from (the sampler refuses requests made
    for other weights)."""
    inputs, outputs = sampler_io(image, cond)
    params = {"models": json.dumps(dict(networks), sort_keys=True), "torch_threads": "1", "bls_timeout_us": "0",
              FLOW_TTRUNC_PARAM: encode_ttrunc_param(flow_ttrunc),
              WEIGHTS_PARAM: json.dumps(dict(weights or {}), sort_keys=True)}
    return _template("sampler.pbtxt.in").substitute(
        model_name=SAMPLER_MODEL, bls_models=", ".join(networks.values()), max_batch_size=options.max_batch_size,
        inputs=",\n".join(t.pbtxt() for t in inputs), outputs=",\n".join(t.pbtxt() for t in outputs),
        instances=options.sampler_instances, parameters=_params(params))

