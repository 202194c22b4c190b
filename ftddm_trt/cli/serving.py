"""`ftddm-trt triton-repo` (generate a Triton model repository), `ftddm-trt verify-repo` (check its network
files) and `ftddm-trt serve` (run tritonserver)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.cli.app import app
from ftddm_trt.cli.common import check_output_dir, console, fail


def _export_for(model: Path | None, out: Path, ttrunc: int | None = None) -> Path:
    """The ONNX export of ``model`` beside ``out`` (``OUT-onnx``), reused while its weights are unchanged."""
    from ftddm_trt.atomic import OutputError
    from ftddm_trt.export.manifest import read_manifest
    from ftddm_trt.export.onnx_export import ParityError, export_model_set
    from ftddm_trt.models.model_set import ModelSet

    try:
        models = ModelSet.open(model, ttrunc)
    except FileNotFoundError as err:
        fail(str(err))
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
        fail(str(err))
    return onnx_dir


@app.command("triton-repo")
def triton_repo_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for the model repository (generated; never commit it)."),
    flavor: str = typer.Option(
        "cpu",
        "--flavor",
        help="cpu: Python-backend models running ONNX Runtime (this machine, "
        "nvidia-pytriton's server); gpu: tensorrt_plan / onnxruntime_onnx models (NVIDIA's container); "
        "gpu-python: Python-backend models running the --engines with TensorRT (a server with only the Python "
        "backend).",
    ),
    onnx: Path = typer.Option(
        None, "--onnx", help="Export folder from `ftddm-trt export`; default: export --model into OUT-onnx beside OUT."
    ),
    model: Path = typer.Option(
        None, "--model", help="Model folder to export when --onnx is not given; default: the shipped model."
    ),
    engines: Path = typer.Option(
        None, "--engines", help="Engine folder from `ftddm-trt build-engine` (gpu flavour: tensorrt_plan models)."
    ),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Largest batch each model accepts."),
    queue_delay_us: int = typer.Option(
        200, "--queue-delay-us", help="Dynamic batching: max queue delay in microseconds."
    ),
    dynamic_batching: bool = typer.Option(
        True,
        "--dynamic-batching/--no-dynamic-batching",
        help="Let Triton merge concurrent requests to a network into one batch.",
    ),
    instances: int = typer.Option(1, "--instances", help="Instances per network model."),
    sampler_instances: int = typer.Option(
        2, "--sampler-instances", help="Instances of ftddm_sampler (concurrent sampling loops)."
    ),
    sampler: bool = typer.Option(
        True,
        "--sampler/--no-sampler",
        help="Include ftddm_sampler (server-side loop; needs torch and "
        "ftddm_trt in the server's Python). --no-sampler for NVIDIA's stock container (deploy/).",
    ),
    ttrunc: Optional[int] = typer.Option(
        None,
        "--ttrunc",
        help="Ttrunc of the flow (picks the model's flow for it; checked against --onnx / --engines; recorded for "
             "clients and ftddm_sampler).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
) -> None:
    """Generate a Triton model repository: ftddm_unet, ftddm_unet_full, ftddm_flow and ftddm_sampler.

    Every config.pbtxt is checked with Triton's schema and against the export's tensors before the
    repository is moved into place.
    """
    from ftddm_trt.atomic import OutputError
    from ftddm_trt.serving.repository import FLAVORS, ConfigError, RepoOptions, build_repository

    if flavor not in FLAVORS:
        fail(f"--flavor must be one of {', '.join(FLAVORS)}")
    if engines is not None and flavor == "cpu":
        fail("--engines needs --flavor gpu or gpu-python (TensorRT engines cannot run in the cpu flavour)")
    if engines is None and flavor == "gpu-python":
        fail("--flavor gpu-python runs TensorRT engines: give --engines (from `ftddm-trt build-engine`)")
    if onnx is not None and model is not None:
        fail("give --onnx or --model, not both")
    if onnx is not None and not (onnx / "manifest.json").is_file():
        fail(f"{onnx} holds no manifest.json: not an export written by `ftddm-trt export`")
    if engines is not None and not (engines / "manifest.json").is_file():
        fail(f"{engines} holds no manifest.json: not an engine folder written by `ftddm-trt build-engine`")
    check_output_dir(out, force, tuple(p for p in (onnx, model, engines) if p is not None))
    try:
        options = RepoOptions(max_batch_size=max_batch_size, max_queue_delay_us=queue_delay_us, instances=instances,
                              sampler_instances=sampler_instances, dynamic_batching=dynamic_batching, sampler=sampler)
        onnx_dir = onnx if onnx is not None else _export_for(model, out, ttrunc)
        meta = build_repository(
            onnx_dir, out, flavor, engines, options, force=force, log=console.print, flow_ttrunc=ttrunc
        )
    except (ConfigError, FileNotFoundError, ValueError, OutputError) as err:
        fail(str(err))
    console.print(
        f"[green]{flavor} repository[/] with {', '.join(meta['models'])} in {out} (flow Ttrunc = {meta['flow_ttrunc']})"
    )
    if flavor == "cpu":
        console.print(f"serve it with: ftddm-trt serve --repo {out}")


@app.command("verify-repo")
def verify_repo_cmd(
    repo: Path = typer.Option(..., "--repo", help="Model repository from `ftddm-trt triton-repo`."),
) -> None:
    """Check a model repository before serving it elsewhere (NVIDIA's container, Kubernetes): its configs, and
    every network file against the sha256 `triton-repo` recorded. `serve` does both by itself; a container
    started on the folder directly does not, so run this on the folder it will mount."""
    from ftddm_trt.integrity import IntegrityError
    from ftddm_trt.serving.repository import ConfigError, validate_repository, verify_repository_files

    try:
        configs = validate_repository(repo)
        hashes = verify_repository_files(repo, list(configs))
    except (ConfigError, IntegrityError, FileNotFoundError) as err:
        fail(str(err))
    for model, sha in hashes.items():
        console.print(f"{model}: sha256 {sha[:16]}... as recorded")
    console.print(f"[green]verified[/] {repo}: {len(configs)} models, {len(hashes)} network files")


@app.command("serve")
def serve_cmd(
    repo: Path = typer.Option(..., "--repo", help="Model repository from `ftddm-trt triton-repo`."),
    http_port: int = typer.Option(8000, "--http-port"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    log: Path = typer.Option(
        None,
        "--log",
        help="Server log file (appended); default: a file in the temp folder, "
        "removed after a clean stop and kept (its path printed) after a failure. Never the current folder.",
    ),
    startup_timeout: float = typer.Option(
        300.0, "--startup-timeout", help="Seconds to wait for every model to be ready."
    ),
    validate: bool = typer.Option(
        True, "--validate/--no-validate", help="Check the repository's configs before starting."
    ),
) -> None:
    """Run tritonserver on a repository in the foreground until Ctrl-C or SIGTERM.

    Uses the system's tritonserver when on PATH, else the one bundled in nvidia-pytriton (Python
    backend only: cpu-flavour repositories). Shutdown stops the server and its Python stubs and
    removes the shared-memory regions they leave in /dev/shm.
    """
    from ftddm_trt.serving.launcher import TritonServer, TritonServerError
    from ftddm_trt.serving.repository import ConfigError, validate_repository

    if not repo.is_dir():
        fail(f"model repository {repo} does not exist")
    if validate:
        try:
            validate_repository(repo)
        except ConfigError as err:
            fail(str(err))
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
            fail(f"tritonserver exited by itself (code {code}); log tail:\n{server.log_tail()}", code=1)
        console.print("stopping tritonserver ...")
    except TritonServerError as err:
        fail(str(err), code=1)
    finally:
        if server is not None:
            server.stop()
        for s, h in old.items():
            signal.signal(s, h)
    console.print("stopped")
