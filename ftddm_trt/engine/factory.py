"""Pick and open a backend by name: the one place the CLI and benchmarks construct runtimes."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from ftddm_trt.atomic import OutputBusy
from ftddm_trt.engine.backend import Backend
from ftddm_trt.models.model_set import ModelSet

BACKENDS: tuple[str, ...] = ("onnxruntime", "torch", "tensorrt", "triton")


def cache_root() -> Path:
    """Where exports of a model are cached: $FTDDM_TRT_CACHE, else ~/.cache/ftddm-trt."""
    return Path(os.environ.get("FTDDM_TRT_CACHE", Path.home() / ".cache" / "ftddm-trt"))


def _current_export(folder: Path) -> bool:
    """A cached export that is complete and records the flow's Ttrunc (older ones are redone)."""
    from ftddm_trt.export.manifest import FLOW_TTRUNC_KEY, read_manifest

    try:
        return FLOW_TTRUNC_KEY in read_manifest(folder)
    except (FileNotFoundError, ValueError):
        return False


def onnx_export_for(models: ModelSet, log: Callable[[str], None] = lambda _m: None) -> Path:
    """The ONNX export of ``models``, made once and cached under a key of the weights' hashes."""
    from ftddm_trt.export.onnx_export import export_model_set

    key = hashlib.sha256("".join(f"{k}={v}" for k, v in sorted(models.hashes().items())).encode()).hexdigest()[:16]
    folder = cache_root() / "onnx" / key
    deadline, told = time.monotonic() + 1800, False
    while not _current_export(folder):
        try:
            log(f"exporting the model to ONNX once (cached in {folder}) ...")
            export_model_set(models, folder, force=True, log=log)
            break
        except OutputBusy:  # another run is exporting the same model: wait for its export
            if time.monotonic() > deadline:
                raise
            if not told:
                log(f"another process is exporting into {folder}; waiting for it ...")
                told = True
            time.sleep(1.0)
    return folder


def open_backend(
    kind: str,
    model: Path | None = None,
    onnx_dir: Path | None = None,
    engine_dir: Path | None = None,
    url: str | Sequence[str] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    ttrunc: int | None = None,
    log: Callable[[str], None] = lambda _m: None,
    retry_s: float | None = None,
    clients_per_server: int = 1,
    start: str = "flow",
    require: Sequence[str] | None = None,
) -> Backend:
    """Open backend ``kind`` for a model folder (default: the shipped model) and, for the in-process
    backends, the flow trained for ``ttrunc`` (see ``ModelSet.open``); ``start="tdpm"`` serves the TDPM
    generator in the flow's place (in-process backends only). ``url``: one Triton endpoint, or
    several for a ``TritonPool`` with ``clients_per_server`` concurrent clients each. ``retry_s``: how long
    a single Triton server is retried when it stops answering (a pool of several drops it at once).
    ``require``: the networks a Triton server must serve at once (default: the UNet and the flow; the
    ``munet`` / ``flow-enhancer`` samplers need theirs instead)."""
    if start != "flow" and (kind not in ("torch", "onnxruntime") or onnx_dir is not None):
        raise ValueError(f"the {start} start point runs on --backend torch or onnxruntime from a model folder only")
    if kind == "torch":
        from ftddm_trt.engine.torch_backend import TorchBackend

        return TorchBackend(ModelSet.open(model, ttrunc, start=start), device=device, precision=precision)
    if kind == "onnxruntime":
        from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx_dir or onnx_export_for(ModelSet.open(model, ttrunc, start=start), log))
    if kind == "tensorrt":
        from ftddm_trt.engine.tensorrt_backend import TensorRTBackend

        if engine_dir is None:
            raise ValueError("--backend tensorrt needs --engines DIR (built by `ftddm-trt build-engine`)")
        return TensorRTBackend(engine_dir)
    if kind == "triton":
        urls = [url] if isinstance(url, str) else list(url or ["localhost:8001"])
        needs = {} if require is None else {"require": tuple(require)}
        if len(urls) > 1 or clients_per_server > 1:  # batches spread over the servers that are up
            from ftddm_trt.engine.triton_pool import TritonPool

            # with other servers to fail over to, a server that stops answering is dropped at once and its
            # batch rerun elsewhere; waiting out a restart (retry_s) is for a single server
            return TritonPool(urls, clients_per_server=clients_per_server, log=log,
                              retry_s=0.0 if len(urls) > 1 else retry_s, **needs)
        from ftddm_trt.engine.triton_backend import TritonBackend

        return TritonBackend(urls[0], retry_s=retry_s, **needs)
    raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
