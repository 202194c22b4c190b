"""Generate and validate a Triton model repository from an ONNX export.

Input: an export folder written by ``export.onnx_export.export_model_set`` (``unet.onnx``,
``unet_full.onnx``, ``flow.onnx``, ``manifest.json`` with each graph's inputs and outputs).
Output (``build_repository``)::

    OUT/repository.json                 flavour, options, export manifest (Triton ignores files here)
    OUT/ftddm_unet/config.pbtxt         x_t [1,64,64], y [4,64,64], t [1]*, s [1]* -> eps [1,64,64]
    OUT/ftddm_unet/1/model.{py,onnx,plan}
    OUT/ftddm_unet_full/...             same tensors (UNet trained on the whole chain)
    OUT/ftddm_flow/...                  eps [1,64,64], y [4,64,64], tau_f [1]* -> x [1,64,64]
    OUT/ftddm_sampler/config.pbtxt      y [4,64,64], s [1]*, parameter "settings" -> x0 [1,64,64], nfe [1]
    OUT/ftddm_sampler/1/model.py        the whole sampling loop over BLS requests

    * per-item scalars: the ONNX graphs take (B,); with max_batch_size > 0 Triton's dims exclude the
      batch, so they are dims [1] with ``reshape: { shape: [ ] }`` (clients send (B, 1)).

Flavours, from the same function:

- ``cpu``: every model is ``backend: "python"``; the network models run their ONNX file with ONNX
  Runtime (``serving/triton_templates/python/onnx_network.py``). For the nvidia-pytriton server, which has only
  the Python backend.
- ``gpu``: the network models are ``platform: "tensorrt_plan"`` with the engines of an engine folder
  (``ftddm-trt build-engine``) when one is given, else ``platform: "onnxruntime_onnx"`` with the
  TensorRT execution accelerator (engine cache path and min/opt/max profile shapes set); for NVIDIA's
  Triton container. The sampler stays a Python model.
- ``gpu-python``: the network models are ``backend: "python"`` on KIND_GPU running the engines of an
  engine folder (required) with TensorRT from Python (``serving/triton_templates/python/tensorrt_network.py``): a
  server with only the Python backend (nvidia-pytriton's tritonserver) can load it.

Config text comes from the templates in ``serving/triton_templates/templates`` (shipped inside the package);
every generated config is parsed with Triton's own schema (``model_config_pb2.ModelConfig``) and checked by
``validate_config`` before the repository is moved into place (atomic, like the export).
"""

from __future__ import annotations

import json
import os
import shutil
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ftddm_trt.atomic import atomic_dir
from ftddm_trt.engine.model_check import WEIGHTS_PARAM
from ftddm_trt.engine.triton_backend import (
    FLOW_TTRUNC_PARAM,
    SAMPLER_MODEL,
    TRITON_MODELS,
    decode_ttrunc_param,
    encode_ttrunc_param,
)
from ftddm_trt.export.manifest import (
    FLOW_TTRUNC_KEY,
    TtruncMismatch,
    manifest_flow_ttrunc,
    read_manifest,
    resolve_flow_ttrunc,
)
from ftddm_trt.integrity import IntegrityError, verify_file

FLAVORS = ("cpu", "gpu", "gpu-python")
#: Where the ONNX Runtime TensorRT accelerator of the gpu flavour caches its engines (inside the server).
DEFAULT_TRT_CACHE_PATH = "/tmp/ftddm-trt-engine-cache"
#: Source of the config templates and of the Python-backend model code (source only; never generated into).
def triton_templates_dir() -> Path:
    """The Triton templates and Python-backend model code: ``$FTDDM_TRITON_REPO_SRC`` if set, else the
    copy shipped inside the package (``ftddm_trt/serving/triton_templates``, package data of the wheel)."""
    return Path(os.environ.get("FTDDM_TRITON_REPO_SRC", Path(__file__).resolve().parents[1] / "triton_templates"))


TRITON_REPO_SRC = triton_templates_dir()
REPOSITORY_JSON = "repository.json"
#: repository.json key: ``{model: {"file": "1/model.onnx" | "1/model.plan", "sha256": ...}}``, the network file
#: placed in each network model (hashed as placed; checked by :func:`verify_repository_files` before a start).
FILES_KEY = "files"
GPU_PLATFORMS = ("tensorrt_plan", "onnxruntime_onnx")
TRT_PRECISIONS = ("FP32", "FP16")
_MODEL_TO_NETWORK = {m: n for n, m in TRITON_MODELS.items()}
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


# -- validation ------------------------------------------------------------------------------------
def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse config.pbtxt text with Triton's schema; ConfigError with the parser's message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as err:
        raise ConfigError(f"{where} does not parse as a Triton ModelConfig: {err}") from err
    return cfg


def _check_tensors(where: str, kind: str, got, expected: list[TensorIO]) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    names = [t.name for t in got]
    want = [t.name for t in expected]
    if sorted(names) != sorted(want) or len(set(names)) != len(names):
        raise ConfigError(f"{where}: {kind}s {names} do not match the export's {want}")
    by_name = {t.name: t for t in got}
    for exp in expected:
        t = by_name[exp.name]
        dtype = pb.DataType.Name(t.data_type)
        if dtype != exp.data_type:
            raise ConfigError(f"{where}: {kind} {exp.name} has data_type {dtype}, expected {exp.data_type}")
        if tuple(t.dims) != exp.dims:
            raise ConfigError(f"{where}: {kind} {exp.name} has dims {list(t.dims)}, expected {list(exp.dims)} "
                              "(dims exclude the batch dimension)")
        has_reshape = t.HasField("reshape")
        if exp.scalar and (not has_reshape or list(t.reshape.shape)):
            raise ConfigError(f"{where}: {kind} {exp.name} is one scalar per item (graph shape (B,)): it needs "
                              "dims [1] with reshape: { shape: [ ] }")
        if not exp.scalar and has_reshape:
            raise ConfigError(f"{where}: {kind} {exp.name} must not be reshaped")


def validate_config(
    text: str,
    flavor: str | None = None,
    manifest: Mapping[str, Any] | None = None,
    expected_name: str | None = None,
    where: str | None = None,
):
    """Parse a config.pbtxt with Triton's schema and check it against what ftddm-trt serves.

    Checks: the model is one of ftddm_unet / ftddm_unet_full / ftddm_flow / ftddm_sampler (and named
    ``expected_name`` if given); max_batch_size >= 1; platform/backend allowed for the flavour (cpu:
    python only; gpu: tensorrt_plan or onnxruntime_onnx networks, python sampler); tensor names,
    data types and dims equal to the export manifest's graph I/O (or the exporter's defaults);
    per-item scalars as dims [1] + reshape []; dynamic batching on network models only, with preferred
    sizes in 1..max_batch_size; instance groups with count >= 1 of the flavour's kind.
    Returns the parsed ``ModelConfig``; raises ``ConfigError`` saying what is wrong and where.
    """
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = parse_config(text, where or "config.pbtxt")
    where = where or f"config of {cfg.name or '(unnamed model)'}"
    if flavor is not None and flavor not in FLAVORS:
        raise ConfigError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if not cfg.name:
        raise ConfigError(f"{where}: the model has no name")
    if expected_name is not None and cfg.name != expected_name:
        raise ConfigError(
            f"{where}: the model is named {cfg.name!r} but its folder is {expected_name!r} (Triton requires them equal)"
        )
    known = (*TRITON_MODELS.values(), SAMPLER_MODEL)
    if cfg.name not in known:
        raise ConfigError(f"{where}: unknown model {cfg.name!r}; an ftddm-trt repository holds {', '.join(known)}")
    if cfg.max_batch_size < 1:
        raise ConfigError(
            f"{where}: max_batch_size must be >= 1 (requests carry a batch dimension), got {cfg.max_batch_size}"
        )
    if cfg.platform and cfg.backend:
        raise ConfigError(
            f"{where}: set platform or backend, not both (platform {cfg.platform!r}, backend {cfg.backend!r})"
        )
    is_sampler = cfg.name == SAMPLER_MODEL
    runtime = cfg.platform or cfg.backend
    if not runtime:
        raise ConfigError(f"{where}: neither platform nor backend is set")
    if is_sampler or flavor == "cpu":
        if cfg.backend != "python":
            what = "the sampler" if is_sampler else "a cpu-flavour model"
            raise ConfigError(
                f'{where}: {what} must be backend "python" (the CPU server has only the Python backend), got '
                f'{runtime!r}'
            )
    elif flavor == "gpu":
        if cfg.platform not in GPU_PLATFORMS:
            raise ConfigError(
                f"{where}: a gpu-flavour network must be platform {' or '.join(GPU_PLATFORMS)}, got {runtime!r}"
            )
    elif flavor == "gpu-python":
        if cfg.backend != "python":
            raise ConfigError(
                f'{where}: a gpu-python network must be backend "python" (TensorRT from Python), got {runtime!r}'
            )
    elif cfg.backend != "python" and cfg.platform not in GPU_PLATFORMS:
        raise ConfigError(f"{where}: platform/backend {runtime!r} is not one ftddm-trt generates")
    if is_sampler:
        ins, outs = sampler_io()
        if cfg.HasField("dynamic_batching"):
            raise ConfigError(f"{where}: the sampler must not use dynamic batching (one request is one seeded batch)")
    else:
        network = _MODEL_TO_NETWORK[cfg.name]
        ins, outs = manifest_network_io(manifest, network) if manifest is not None else default_network_io(network)
        if cfg.HasField("dynamic_batching"):
            db = cfg.dynamic_batching
            bad = [b for b in db.preferred_batch_size if not 1 <= b <= cfg.max_batch_size]
            if bad:
                raise ConfigError(
                    f"{where}: dynamic_batching preferred_batch_size {bad} outside "
                    f"1..max_batch_size={cfg.max_batch_size}"
                )
    _check_tensors(where, "input", cfg.input, ins)
    _check_tensors(where, "output", cfg.output, outs)
    for g in cfg.instance_group:
        if g.count < 1:
            raise ConfigError(f"{where}: instance_group count must be >= 1, got {g.count}")
        kind = pb.ModelInstanceGroup.Kind.Name(g.kind)
        allowed = (
            ("KIND_CPU",)
            if (is_sampler or flavor == "cpu")
            else ("KIND_GPU", "KIND_AUTO")
            if flavor in ("gpu", "gpu-python")
            else ("KIND_CPU", "KIND_GPU", "KIND_AUTO")
        )
        if kind not in allowed:
            raise ConfigError(f"{where}: instance_group kind {kind} not allowed here (use {' or '.join(allowed)})")
    return cfg


def _model_file(cfg) -> str:
    return {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}.get(cfg.platform, "model.py")


def validate_repository(
    repo: Path | str, flavor: str | None = None, manifest: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Validate every model of a generated repository (configs, version folder files, sampler
    dependencies). ``flavor``/``manifest`` default to what ``repository.json`` records.
    Returns ``{model name: ModelConfig}``."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ConfigError(f"model repository {repo} does not exist")
    meta_path = repo / REPOSITORY_JSON
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    flavor = flavor or meta.get("flavor")
    manifest = manifest if manifest is not None else meta.get("export_manifest")
    configs: dict[str, Any] = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        path = d / "config.pbtxt"
        if not path.is_file():
            raise ConfigError(f"{d} has no config.pbtxt")
        cfg = validate_config(path.read_text(), flavor, manifest, expected_name=d.name, where=str(path))
        network_file = "model.plan" if flavor == "gpu-python" else "model.onnx"
        need = [_model_file(cfg)] + ([network_file] if cfg.backend == "python" and cfg.name != SAMPLER_MODEL else [])
        missing = [f for f in need if not (d / "1" / f).is_file()]
        if missing:
            raise ConfigError(f"{d}: version folder 1/ lacks {', '.join(missing)}")
        configs[cfg.name] = cfg
    if not any(n in configs for n in TRITON_MODELS.values()):
        raise ConfigError(f"{repo} holds none of the network models {', '.join(TRITON_MODELS.values())}")
    _check_ttrunc_params(repo, configs, meta)
    if SAMPLER_MODEL in configs:
        params = configs[SAMPLER_MODEL].parameters
        called = json.loads(params["models"].string_value) if "models" in params else {}
        absent = [m for m in called.values() if m not in configs]
        if not called or absent:
            raise ConfigError(
                f"{repo}: {SAMPLER_MODEL} calls models that the repository lacks: {absent or '(none listed)'}"
            )
    return configs


def verify_repository_files(repo: Path | str, models: list[str] | None = None) -> dict[str, str]:
    """Hash the network file of every network model in ``models`` (default: every one recorded) against the
    sha256 that ``repository.json`` recorded when ``triton-repo`` placed it; returns ``{model: sha256}``.

    Triton's own onnxruntime and tensorrt backends (the gpu flavour) load these files unchecked, so this
    runs before any server starts (the Python-backend models also check their file at load). Raises
    IntegrityError naming the file: a changed file, a model without a recorded hash, or a folder that
    ``triton-repo`` did not write (no repository.json)."""
    repo = Path(repo)
    meta_path = repo / REPOSITORY_JSON
    if not meta_path.is_file():
        raise IntegrityError(f"IntegrityError: {repo} has no {REPOSITORY_JSON}: not a repository written by "
                             "`ftddm-trt triton-repo`, so its network files cannot be verified")
    recorded = json.loads(meta_path.read_text()).get(FILES_KEY) or {}
    wanted = [m for m in (models if models is not None else list(recorded)) if m in _MODEL_TO_NETWORK]
    hashes = {}
    for m in wanted:
        info = recorded.get(m)
        if not info:
            raise IntegrityError(f"IntegrityError: {meta_path} records no sha256 for {m}'s network file; "
                                 "regenerate the repository with `ftddm-trt triton-repo`")
        hashes[m] = verify_file(repo / m / info["file"], info.get("sha256"), what=f"{m} network file")
    return hashes


def _check_ttrunc_params(repo: Path, configs: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """ftddm_flow and ftddm_sampler carry the same ``flow_ttrunc`` parameter as repository.json."""
    found: dict[str, int | None] = {}
    for model in (TRITON_MODELS["flow"], SAMPLER_MODEL):
        if model in configs:
            params = {k: v.string_value for k, v in configs[model].parameters.items()}
            try:
                found[model] = decode_ttrunc_param(params, f"{repo}/{model}/config.pbtxt")
            except (TtruncMismatch, ValueError) as err:
                raise ConfigError(str(err)) from err
    if FLOW_TTRUNC_KEY in meta:
        found[REPOSITORY_JSON] = meta[FLOW_TTRUNC_KEY]
    if len(set(found.values())) > 1:
        raise ConfigError(
            f"{repo}: the flow's Ttrunc differs between {', '.join(f'{k} ({v})' for k, v in found.items())}"
        )


# -- generation ------------------------------------------------------------------------------------
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
