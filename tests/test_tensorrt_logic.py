"""TensorRT 10/11 build logic that runs without a GPU: the fp32-node selection on the exported graph and
its fp16 conversion (checked in ONNX Runtime CPU), the build-time precision gate, network flags, atomic
writes, cache keys and the refusal of an unsupported TensorRT major."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
import torch

from ftddm_trt.atomic import write_bytes_atomic
from ftddm_trt.export import fp16
from ftddm_trt.export.onnx_export import random_inputs
from ftddm_trt.export.tensorrt_build import (
    TOLERANCES,
    BatchProfile,
    PrecisionError,
    TensorRTUnavailable,
    Tolerance,
    check_precision,
    engine_cache_key,
    network_flags,
    network_is_fp16,
    precision_policy,
    tensorrt_major,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def unet_graph(tiny_onnx_export):
    return onnx.load(str(tiny_onnx_export / "unet.onnx"))


def _producer(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


def test_selection_holds_the_mul_nodes_feeding_sin_and_cos(unet_graph):
    keep = {unet_graph.graph.node[k].name for k in fp16.fp32_node_indices(unet_graph)}
    trig = [n for n in unet_graph.graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) >= 4  # t and s embeddings, sin and cos each
    for node in trig:
        assert node.name in keep
        arg = _producer(unet_graph, node.input[0])
        assert arg.op_type == "Mul" and arg.name in keep, f"the argument of {node.name} must be computed in fp32"
    # the walk starts at t and s: their first consumers are kept, and it stops before the first Gemm
    consumers_of_inputs = [n for n in unet_graph.graph.node if set(n.input) & {"t", "s"}]
    assert consumers_of_inputs and all(n.name in keep for n in consumers_of_inputs)
    emb = {unet_graph.graph.node[k].op_type for k in fp16.embedding_node_indices(unet_graph)}
    assert not emb & {"Gemm", "MatMul", "Conv"}
    kept_types = {unet_graph.graph.node[k].op_type for k in fp16.fp32_node_indices(unet_graph)}
    assert "InstanceNormalization" in kept_types and "Conv" not in kept_types


def test_selection_is_by_structure_not_names(unet_graph):
    renamed = onnx.ModelProto.FromString(unet_graph.SerializeToString())
    for i, node in enumerate(renamed.graph.node):
        node.name = f"n{i}"
    assert fp16.fp32_node_indices(renamed) == fp16.fp32_node_indices(unet_graph)


def test_flow_selection_keeps_its_exp_and_div(tiny_onnx_export):
    flow = onnx.load(str(tiny_onnx_export / "flow.onnx"))
    kept = [flow.graph.node[k].op_type for k in fp16.fp32_node_indices(flow)]
    assert "Exp" in kept and "Div" in kept and "Conv" not in kept


def test_fp16_unet_runs_in_onnxruntime_close_to_fp32(unet_graph):
    import onnxruntime as ort

    converted, block = fp16.convert_fp16(unet_graph)
    counts = fp16.float_types(converted)
    assert counts["float16"] > counts["float32"]  # the weights went to fp16
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [onnx.TensorProto.FLOAT] * 4
    by_name = {n.name: n for n in converted.graph.node}
    for name in block:  # every kept node computes in fp32 in the converted graph
        assert name in by_name
    casts = [n for n in converted.graph.node if n.op_type == "Cast"]
    assert casts, "fp16 must come from explicit casts in the graph"
    feeds = {k: v.numpy() for k, v in random_inputs("unet", 4, torch.Generator().manual_seed(0)).items()}
    feeds["t"] = np.array([1.0, 37.0, 100.0, 99.0], np.float32)
    ref = ort.InferenceSession(unet_graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    res = check_precision("unet", ref, got, TOLERANCES["fp16"])
    assert 0 < res["max_abs_error"] <= res["limit"]


def test_without_the_embedding_block_t_would_err(unet_graph):
    """The argument t * freq at t ~ 1000 in fp16 is off by up to 0.5 / 2 rad: why the walk is needed."""
    t = np.float32(999.0)
    freq = np.float32(0.9)
    exact = float(t) * float(freq)
    half = float(np.float16(np.float16(t) * np.float16(freq)))
    assert abs(half - exact) > 0.05


def test_check_precision():
    ref = np.linspace(-1, 1, 100).reshape(1, 1, 10, 10)
    tol = Tolerance(atol=1e-2, rtol=1e-2)
    assert check_precision("unet", ref, ref + 5e-3, tol)["max_abs_error"] == pytest.approx(5e-3)
    with pytest.raises(PrecisionError, match="unet: engine differs"):
        check_precision("unet", ref, ref + 0.05, tol)
    bad = ref.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(PrecisionError, match="non-finite"):
        check_precision("flow", ref, bad, tol)
    with pytest.raises(PrecisionError, match="shape"):
        check_precision("flow", ref, ref[..., :5], tol)
    big = 100 * ref  # the limit scales with the reference
    check_precision("flow", big, big + 0.5, tol)


def test_policy_and_cache_key():
    assert network_is_fp16("unet", "fp16") and network_is_fp16("unet_full", "fp16")
    assert not network_is_fp16("flow", "fp16") and not network_is_fp16("unet", "fp32")
    pol = precision_policy("fp16")
    assert "Exp" in pol["fp32_op_types"] and pol["scalar_inputs"] == ["t", "s"]
    base = dict(onnx_sha256="a" * 64, trt_version="11.4.0", gpu_name="NVIDIA H200", precision="fp16",
                profile=BatchProfile(1, 16, 128), build_options={"workspace_gib": 4.0})
    k = engine_cache_key(**base)
    assert k != engine_cache_key(**{**base, "build_options": {"workspace_gib": 2.0}})
    with pytest.raises(ValueError, match="precision"):
        engine_cache_key(**{**base, "precision": "int8"})


def test_network_flags_for_tensorrt_10_and_11():
    class Flag10:
        STRONGLY_TYPED = 1  # TensorRT 10: EXPLICIT_BATCH = 0 (ignored), STRONGLY_TYPED = 1

    class Flag11:
        STRONGLY_TYPED = 0  # TensorRT 11: retained, deprecated, ignored

    assert network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=Flag10)) == 2
    assert network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=Flag11)) == 1
    assert network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())) == 0


def test_supported_majors():
    assert tensorrt_major("10.13.0.35") == 10 and tensorrt_major("11.4.0") == 11
    for v in ("8.6.1", "12.0.0", "x"):
        with pytest.raises(TensorRTUnavailable):
            tensorrt_major(v)


def test_atomic_write_bytes(tmp_path, monkeypatch):
    path = tmp_path / "timing.cache"
    write_bytes_atomic(path, b"old")
    import ftddm_trt.atomic as atomic

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["timing.cache"]


def test_the_timing_cache_result_is_checked(tmp_path, monkeypatch):
    """A foreign cache (set_timing_cache -> False) is replaced by a fresh one, never used half-attached."""
    import sys

    calls = []

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"fresh-cache"

    class Config:
        def set_memory_pool_limit(self, *a):
            pass

        def create_timing_cache(self, data):
            calls.append(("create", bytes(data)))
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set", cache.data))
            return cache.data == b""  # the foreign bytes are rejected

        def add_optimization_profile(self, p):
            pass

        def get_timing_cache(self):
            return Cache(b"")

    class Network:
        num_inputs = 0

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return object()

        def build_serialized_network(self, network, config):
            return b"plan"

    class Parser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    fake = types.SimpleNamespace(
        __version__="11.4.0", Logger=type("L", (), {"WARNING": 0, "__init__": lambda self, *a: None}),
        Builder=Builder, OnnxParser=Parser, MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    from ftddm_trt.export.tensorrt_build import build_engine

    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-another-gpu")
    logs = []
    build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", BatchProfile(1, 2, 4), cache, log=logs.append)
    assert ("set", b"from-another-gpu") in calls and ("set", b"") in calls and ("flags", 1) in calls
    assert any("fresh one" in m for m in logs)
    assert (tmp_path / "x.plan").read_bytes() == b"plan" and cache.read_bytes() == b"fresh-cache"
