"""deploy/: the compose file and Kubernetes manifests, parsed and checked against a generated repository.

The repository comes from `ftddm-trt triton-repo --flavor gpu --no-sampler` (the command deploy/README.md
gives) over a placeholder export, so model names are those the generator writes; ports are those of
`ftddm-trt serve`; paths are the mount the server's --model-repository points at.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from test_triton_repo import _fake_export
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.serving.repository.build import build_repository
from ftddm_trt.serving.repository.render import RepoOptions
from ftddm_trt.serving.repository.validate import validate_repository

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
runner = CliRunner()


def serve_ports() -> dict[str, int]:
    """Default ports of `ftddm-trt serve` (what clients and docs assume)."""
    from ftddm_trt.cli.serving import serve_cmd

    p = inspect.signature(serve_cmd).parameters
    return {"http": p["http_port"].default.default, "grpc": p["grpc_port"].default.default,
            "metrics": p["metrics_port"].default.default}


def flags(args: list[str]) -> dict[str, list[str]]:
    """``--key=value`` arguments of tritonserver, each key to its values in order."""
    out: dict[str, list[str]] = {}
    for a in args:
        m = re.fullmatch(r"--([a-z-]+)=(.*)", a)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The generated gpu repository, written where deploy/README.md says (deploy/model_repository)."""
    root = tmp_path_factory.mktemp("deploy")
    onnx = _fake_export(root / "onnx")
    out = root / "deploy" / "model_repository"
    res = runner.invoke(app, ["triton-repo", "--flavor", "gpu", "--no-sampler", "--onnx", str(onnx), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def sampler_repo(tmp_path_factory) -> Path:
    """The gpu repository with ftddm_sampler, as model-fill-job.yaml generates it for the server image."""
    root = tmp_path_factory.mktemp("deploy-sampler")
    out = root / "v1"
    res = runner.invoke(
        app, ["triton-repo", "--flavor", "gpu", "--onnx", str(_fake_export(root / "onnx")), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    return out


def repo_models(repo: Path) -> set[str]:
    return set(validate_repository(repo))


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def check_server_args(args: list[str], repo: Path, mount: str) -> dict[str, list[str]]:
    f = flags(args)
    assert args[0] == "tritonserver"
    assert f["model-repository"] == [mount]
    assert f["model-control-mode"] == ["explicit"]
    assert set(f["load-model"]) == repo_models(repo) and len(f["load-model"]) == len(repo_models(repo))
    ports = serve_ports()
    assert {k: int(f[f"{k}-port"][0]) for k in ports} == ports
    return f


def test_readme_generates_what_the_files_mount(repo):
    text = (DEPLOY / "README.md").read_text()
    assert "ftddm-trt triton-repo --flavor gpu --no-sampler --out deploy/model_repository" in text
    assert repo_models(repo) == {"ftddm_unet", "ftddm_unet_full", "ftddm_flow"}  # no sampler: stock container
    assert "model_repository/" in (DEPLOY / ".gitignore").read_text()
    assert "## Rolling out a new model" in text


def test_compose(repo):
    (svc,) = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"].values()
    assert svc["image"].startswith("nvcr.io/nvidia/tritonserver:") and svc["image"].endswith("-py3")
    (vol,) = svc["volumes"]
    assert (DEPLOY / vol["source"]).resolve().name == repo.name == "model_repository" and vol["read_only"]
    f = check_server_args(svc["command"], repo, vol["target"])
    published = {int(p.split(":")[1].split()[0]) for p in svc["ports"]}
    assert published == {int(f[f"{k}-port"][0]) for k in ("http", "grpc", "metrics")}
    health = " ".join(svc["healthcheck"]["test"])
    assert f"localhost:{serve_ports()['http']}/v2/health/ready" in health
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_kubernetes(sampler_repo):
    repo = sampler_repo
    (dep,) = load_all(K8S / "deployment.yaml")
    assert dep["kind"] == "Deployment" and dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    tmpl = dep["spec"]["template"]
    labels = tmpl["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = tmpl["spec"]["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "model-repository"]
    f = check_server_args(c["args"], repo, mount["mountPath"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {k: int(f[f"{k}-port"][0]) for k in ("http", "grpc", "metrics")}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
    assert ann["prometheus.io/path"] == "/metrics"
    (vol,) = [v for v in tmpl["spec"]["volumes"] if v["name"] == "model-repository"]
    (pvc,) = load_all(K8S / "model-repository-pvc.yaml")
    assert (
        pvc["kind"] == "PersistentVolumeClaim" and vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    )
    assert "ReadOnlyMany" in pvc["spec"]["accessModes"]

    services = load_all(K8S / "service.yaml")
    assert {s["kind"] for s in services} == {"Service"}
    for s in services:
        assert s["spec"]["selector"].items() <= labels.items()
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]
    assert any(s["spec"].get("clusterIP") == "None" for s in services)  # headless: one --url per pod
    (mon,) = load_all(K8S / "servicemonitor.yaml")
    assert mon["spec"]["selector"]["matchLabels"].items() <= services[0]["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] == "metrics" and mon["spec"]["endpoints"][0]["path"] == "/metrics"


def test_dynamic_batching_toggle(tmp_path):
    onnx = _fake_export(tmp_path / "onnx")
    for on in (True, False):
        out = tmp_path / f"repo-{on}"
        build_repository(
            onnx, out, "cpu", options=RepoOptions(dynamic_batching=on, max_queue_delay_us=500), log=lambda _m: None
        )
        configs = validate_repository(out)
        for name in ("ftddm_unet", "ftddm_unet_full", "ftddm_flow"):
            assert configs[name].HasField("dynamic_batching") is on
            if on:
                assert configs[name].dynamic_batching.max_queue_delay_microseconds == 500
        assert not configs["ftddm_sampler"].HasField("dynamic_batching")
    res = runner.invoke(app, ["triton-repo", "--flavor", "cpu", "--no-dynamic-batching", "--onnx", str(onnx),
                              "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert not validate_repository(tmp_path / "cli")["ftddm_unet"].HasField("dynamic_batching")
