"""`ftddm-trt triton-repo` (generate a Triton model repository), `ftddm-trt verify-repo` (check its network
files) and `ftddm-trt serve` (run tritonserver)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.atomic import OutputError
from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import EXPERT, Command
from ftddm_trt.cli.common import SHIPPED_MODEL, console, fail
from ftddm_trt.workflows.deploy import DeployError, make_triton_repo, serve_repository


@app.command("triton-repo", cls=Command, rich_help_panel="Deploy")
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
    onnx: Optional[Path] = typer.Option(
        None, "--onnx", help="Export folder from `ftddm-trt export`.",
        show_default="--model exported into OUT-onnx beside --out",
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model folder to read when --onnx is not given.", show_default=SHIPPED_MODEL
    ),
    engines: Optional[Path] = typer.Option(
        None, "--engines", help="Engine folder from `ftddm-trt build-engine` (gpu flavour: tensorrt_plan models).",
        show_default="none",
    ),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Largest batch each model accepts."),
    queue_delay_us: int = typer.Option(
        200, "--queue-delay-us", help="Dynamic batching: max queue delay in microseconds.", **EXPERT
    ),
    dynamic_batching: bool = typer.Option(
        True,
        "--dynamic-batching/--no-dynamic-batching",
        help="Let Triton merge concurrent requests to a network into one batch.",
    ),
    instances: int = typer.Option(1, "--instances", help="Instances per network model."),
    sampler_instances: int = typer.Option(
        2, "--sampler-instances", help="Instances of ftddm_sampler (concurrent sampling loops).", **EXPERT
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
        show_default="the model's main flow",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder.", show_default="off"),
) -> None:
    """Generate a Triton model repository: ftddm_unet, ftddm_unet_full, ftddm_flow and ftddm_sampler.

    Every config.pbtxt is checked with Triton's schema and against the export's tensors before the
    repository is moved into place.
    """
    from ftddm_trt.serving.repository import RepoOptions

    try:
        options = RepoOptions(max_batch_size=max_batch_size, max_queue_delay_us=queue_delay_us, instances=instances,
                              sampler_instances=sampler_instances, dynamic_batching=dynamic_batching, sampler=sampler)
        meta = make_triton_repo(out, flavor, onnx, model, engines, options, ttrunc=ttrunc, force=force)
    except DeployError as err:
        fail(str(err), code=err.exit_code)
    except (OutputError, ValueError) as err:
        fail(str(err))
    console.print(
        f"[green]{flavor} repository[/] with {', '.join(meta['models'])} in {out} (flow Ttrunc = {meta['flow_ttrunc']})"
    )
    if flavor == "cpu":
        console.print(f"serve it with: ftddm-trt serve --repo {out}")


@app.command("verify-repo", cls=Command, rich_help_panel="Deploy")
def verify_repo_cmd(
    repo: Path = typer.Option(..., "--repo", help="Model repository from `ftddm-trt triton-repo`."),
) -> None:
    """Check a model repository's configs and network files before serving it elsewhere.

    For NVIDIA's container or Kubernetes: the configs, and every network file against the sha256
    `triton-repo` recorded. `serve` does both by itself; a container started on the folder directly does
    not, so run this on the folder it will mount."""
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


@app.command("serve", cls=Command, rich_help_panel="Deploy")
def serve_cmd(
    repo: Path = typer.Option(..., "--repo", help="Model repository from `ftddm-trt triton-repo`."),
    http_port: int = typer.Option(8000, "--http-port", help="Port of Triton's HTTP/REST endpoint."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="Port of Triton's gRPC endpoint (what --url names)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Port of Triton's Prometheus metrics."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    log: Optional[Path] = typer.Option(
        None,
        "--log",
        help="Server log file (appended). Without it, a file in the temp folder, removed after a clean stop and kept "
        "(its path printed) after a failure; never the current folder.",
        show_default="a file in the temp folder",
    ),
    startup_timeout: float = typer.Option(
        300.0, "--startup-timeout", help="Seconds to wait for every model to be ready.", **EXPERT
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
    try:
        serve_repository(repo, http_port, grpc_port, metrics_port, host=host, log=log,
                         startup_timeout=startup_timeout, validate=validate)
    except DeployError as err:
        fail(str(err), code=err.exit_code)
