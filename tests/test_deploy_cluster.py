"""The GPU-cluster deployment: manifests valid against the Kubernetes schemas (kubernetes-validate), the
Jobs and the Deployment wired to one another, and the Dockerfiles copying only files that exist.
Nothing here runs a container or a cluster (docs/deployment.md says what has run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ftddm_trt.serving.repository.render import DEFAULT_TRT_CACHE_PATH

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
KUBERNETES_VERSION = "1.30.0"
#: Custom resources whose schemas ship with their operators, not with Kubernetes.
CRDS = {"ServiceMonitor"}


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(K8S.glob("*.yaml")):
        for d in docs(f.name):
            out.setdefault(d["kind"], []).append(d)
    return out


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def script(container: dict) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path):
    for d in yaml.safe_load_all(path.read_text()):
        if d and d["kind"] not in CRDS:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    (job,) = docs("model-fill-job.yaml")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_claims_exist_and_gpu_pods_have_the_prerequisites():
    kinds = by_kind()
    claims = {c["metadata"]["name"] for c in kinds["PersistentVolumeClaim"]}
    (runtime,) = kinds["RuntimeClass"]
    workloads = kinds["Deployment"] + kinds["Job"]
    assert {j["metadata"]["name"] for j in kinds["Job"]} == {"ftddm-fill-model-repository", "ftddm-build-engines",
                                                             "ftddm-upscale-cohort"}
    for w in workloads:
        spec = pod_spec(w)
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, w["metadata"]["name"]
        gpu = any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in spec["containers"])
        if gpu:  # device plugin resource, runtime class, GPU nodes only
            assert spec["runtimeClassName"] == runtime["metadata"]["name"]
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert "unmeasured" in (K8S / _file_of(w)).read_text()  # sizing stated as a guess


def _file_of(obj: dict) -> str:
    for f in K8S.glob("*.yaml"):
        if any(
            d.get("metadata", {}).get("name") == obj["metadata"]["name"] and d["kind"] == obj["kind"]
            for d in docs(f.name)
        ):
            return f.name
    raise AssertionError(obj["metadata"]["name"])


def test_jobs_fill_verify_build_and_run_against_the_servers():
    kinds = by_kind()
    jobs = {j["metadata"]["name"]: pod_spec(j) for j in kinds["Job"]}
    (dep,) = kinds["Deployment"]
    (server,) = pod_spec(dep)["containers"]
    mount = next(m for m in server["volumeMounts"] if m["name"] == "model-repository")

    fill = script(jobs["ftddm-fill-model-repository"]["containers"][0])
    out = re.search(r"triton-repo --flavor gpu --out (\S+)", fill).group(1)
    assert f"verify-repo --repo {out}" in fill and fill.index("triton-repo") < fill.index("verify-repo")
    assert out == f"/repo/{mount['subPath']}"  # fills the folder the servers mount

    build = script(jobs["ftddm-build-engines"]["containers"][0])
    assert "build-engine --onnx /repo/v1-onnx" in build and "verify-repo --repo /repo/v1-trt" in build
    assert jobs["ftddm-build-engines"]["containers"][0]["image"] == server["image"]  # the servers' TensorRT
    cache = next(m for m in server["volumeMounts"] if m["name"] == "engine-cache")
    assert cache["mountPath"] == DEFAULT_TRT_CACHE_PATH  # where triton-repo points ONNX Runtime's TensorRT cache

    client = script(jobs["ftddm-upscale-cohort"]["containers"][0])
    headless = next(s for s in kinds["Service"] if s["spec"].get("clusterIP") == "None")
    grpc = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert f"getent hosts {headless['metadata']['name']}" in client and f":{grpc}" in client
    assert "upscale-cohort" in client and "--backend triton" in client
    assert "--server-loop" not in client or "--load-model=ftddm_sampler" in server["args"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    lines = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines if ln.strip() and not ln.startswith("#")
    ]


@pytest.mark.parametrize("name", ["server.Dockerfile", "client.Dockerfile"])
def test_dockerfiles_copy_files_that_exist(name):
    copies = [args.split() for op, args in _instructions(DOCKER / name) if op == "COPY"]
    assert copies
    for parts in copies:
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"{name} copies {src}, which the repository lacks"


def test_server_image_is_the_named_triton_container_with_its_tensorrt():
    text = (DOCKER / "server.Dockerfile").read_text()
    container = re.search(r"ARG TRITON_CONTAINER=(\S+)", text).group(1)
    trt = re.search(r"ARG TENSORRT_VERSION=(\S+)", text).group(1)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_CONTAINER}-py3" in text
    assert f"NGC container {container} = Triton 2.51, TensorRT {trt}" in text
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["triton"]["image"] == f"nvcr.io/nvidia/tritonserver:{container}-py3"
    assert f"TensorRT {trt}" in (ROOT / "docs" / "deployment.md").read_text()
    assert "import ftddm_trt, torch, tensorrt" in text  # the build fails if the server loop cannot import
