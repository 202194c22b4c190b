"""Validation of a Triton repository: each config.pbtxt parsed with Triton's schema
(``model_config_pb2.ModelConfig``) and checked against the export, whole repositories, and the sha256 of
the network files that ``build_repository`` placed (``repository.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ftddm_trt.engine.triton_backend import SAMPLER_MODEL, TRITON_MODELS, decode_ttrunc_param
from ftddm_trt.export.manifest import FLOW_TTRUNC_KEY, TtruncMismatch
from ftddm_trt.integrity import IntegrityError, verify_file
from ftddm_trt.serving.repository.render import (
    FLAVORS,
    GPU_PLATFORMS,
    ConfigError,
    TensorIO,
    default_network_io,
    manifest_network_io,
    sampler_io,
)

REPOSITORY_JSON = "repository.json"
#: repository.json key: ``{model: {"file": "1/model.onnx" | "1/model.plan", "sha256": ...}}``, the network file
#: placed in each network model (hashed as placed; checked by :func:`verify_repository_files` before a start).
FILES_KEY = "files"
_MODEL_TO_NETWORK = {m: n for n, m in TRITON_MODELS.items()}


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

