"""Triton model repositories and the server: the logic behind `ftddm-trt triton-repo` and `ftddm-trt serve`.

``DeployError`` names why a repository cannot be made or served; its ``exit_code`` is the CLI's (2: a
refused request, 1: the server failed).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from ftddm_trt.atomic import OutputError, check_output
from ftddm_trt.export.manifest import read_manifest, require_fp32_export
from ftddm_trt.workflows.console import console


class DeployError(Exception):
    """A repository that cannot be generated or served; the message names why."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def onnx_export_beside(model: Path | None, out: Path, ttrunc: int | None = None) -> Path:
    """The ONNX export of ``model`` beside ``out`` (``OUT-onnx``), reused while its weights are unchanged."""
    from ftddm_trt.export.onnx_export import ParityError, export_model_set
    from ftddm_trt.models.model_set import ModelSet

    try:
        models = ModelSet.open(model, ttrunc)
    except FileNotFoundError as err:
        raise DeployError(str(err)) from err
    onnx_dir = out.parent / f"{out.name}-onnx"
    if (onnx_dir / "manifest.json").is_file():
        try:
            old = read_manifest(onnx_dir)
            if old.get("model_hashes") == models.hashes() and "flow_ttrunc" in old:
                console.print(f"reusing the ONNX export {onnx_dir} (same weights)")
                return onnx_dir
        except ValueError:
            pass
    console.print(f"exporting {models.root} to ONNX in {onnx_dir}")
    try:
        export_model_set(models, onnx_dir, force=True, log=console.print, flow_ttrunc=ttrunc)
    except (ParityError, OutputError, ValueError) as err:
        raise DeployError(str(err)) from err
    return onnx_dir


def make_triton_repo(out: Path, flavor: str, onnx: Path | None, model: Path | None, engines: Path | None,
                     options, ttrunc: int | None = None, force: bool = False) -> dict:
    """Generate the ``flavor`` repository ``out`` (``serving.repository.build_repository`` with ``options``,
    a ``RepoOptions``) from the export ``onnx``, or from ``model`` exported beside ``out``; returns its
    metadata. The flavour, engines and export are checked, and ``out`` (OutputError), before any work."""
    from ftddm_trt.serving.repository import FLAVORS, ConfigError, build_repository

    if flavor not in FLAVORS:
        raise DeployError(f"--flavor must be one of {', '.join(FLAVORS)}")
    if engines is not None and flavor == "cpu":
        raise DeployError("--engines needs --flavor gpu or gpu-python (TensorRT engines cannot run in the cpu flavour)")
    if engines is None and flavor == "gpu-python":
        raise DeployError("--flavor gpu-python runs TensorRT engines: give --engines (from `ftddm-trt build-engine`)")
    if onnx is not None and model is not None:
        raise DeployError("give --onnx or --model, not both")
    if onnx is not None and not (onnx / "manifest.json").is_file():
        raise DeployError(f"{onnx} holds no manifest.json: not an export written by `ftddm-trt export`")
    if engines is not None and not (engines / "manifest.json").is_file():
        raise DeployError(f"{engines} holds no manifest.json: not an engine folder written by `ftddm-trt build-engine`")
    check_output(out, force, tuple(p for p in (onnx, model, engines) if p is not None))
    if onnx is not None:
        try:  # UnsupportedPrecision for an int8 export
            require_fp32_export(read_manifest(onnx), onnx, "a Triton repository")
        except ValueError as err:
            raise DeployError(str(err)) from err
    try:
        onnx_dir = onnx if onnx is not None else onnx_export_beside(model, out, ttrunc)
        return build_repository(onnx_dir, out, flavor, engines, options, force=force, log=console.print,
                                flow_ttrunc=ttrunc)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        raise DeployError(str(err)) from err


def serve_repository(repo: Path, http_port: int, grpc_port: int, metrics_port: int, host: str = "127.0.0.1",
                     log: Path | None = None, startup_timeout: float = 300.0, validate: bool = True) -> None:
    """Run tritonserver on ``repo`` in the foreground until SIGINT or SIGTERM, then stop it and its stubs.

    DeployError (exit code 2) for a missing or invalid repository; (exit code 1) when the server fails to
    start or exits by itself, with its log's tail."""
    from ftddm_trt.serving.launcher import TritonServer, TritonServerError
    from ftddm_trt.serving.repository import ConfigError, validate_repository

    if not repo.is_dir():
        raise DeployError(f"model repository {repo} does not exist")
    if validate:
        try:
            validate_repository(repo)
        except ConfigError as err:
            raise DeployError(str(err)) from err
    stop_requested: list[int] = []

    def on_signal(signum, _frame):
        stop_requested.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        server = TritonServer(repo, http_port, grpc_port, metrics_port, host=host, log_path=log,
                              startup_timeout_s=startup_timeout)
        server.start(wait=False)
        console.print(f"started {server.install.binary} (pid {server.pid}) on {repo}, log {server.log_path} ...")
        deadline = time.monotonic() + startup_timeout
        while not stop_requested:  # wait for readiness in short slices so that Ctrl-C stays responsive
            try:
                server.wait_ready(timeout_s=1.0)
                break
            except TritonServerError:
                if not server.is_running() or time.monotonic() > deadline:
                    raise
        if not stop_requested and not server.is_running():  # whatever answered, it was not our server
            raise TritonServerError(f"tritonserver exited while starting; log tail:\n{server.log_tail()}")
        if not stop_requested:
            console.print(f"[green]ready[/] in {time.monotonic() - (deadline - startup_timeout):.1f} s: "
                          f"HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  "
                          f"models {', '.join(server.models)}")
            console.print("Ctrl-C or SIGTERM stops it")
        while not stop_requested and server.is_running():
            time.sleep(0.2)
        if not stop_requested:
            code = server.process.returncode if server.process else None
            raise DeployError(f"tritonserver exited by itself (code {code}); log tail:\n{server.log_tail()}",
                              exit_code=1)
        console.print("stopping tritonserver ...")
    except TritonServerError as err:
        raise DeployError(str(err), exit_code=1) from err
    finally:
        if server is not None:
            server.stop()
        for s, h in old.items():
            signal.signal(s, h)
    console.print("stopped")
