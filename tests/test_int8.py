"""int8 exports (`ftddm-trt export --int8`): the QDQ graph, what stays fp32, the manifest, the ONNX Runtime
backend on such an export (a phantom upscaled end to end), and the consumers that refuse it."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.engine.model_check import check_same_model
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
from ftddm_trt.export import int8 as int8_mod
from ftddm_trt.export.fp16 import embedding_node_indices
from ftddm_trt.export.int8 import (
    CalibrationReader,
    CalibrationSettings,
    Int8Error,
    Int8Export,
    conv_roles,
    export_int8,
    quantize_unet,
    quantized_nodes,
)
from ftddm_trt.export.manifest import UnsupportedPrecision, file_sha256
from ftddm_trt.export.onnx_export import real_parity_inputs
from ftddm_trt.export.tensorrt_build import build_engines
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.workflows import export as export_workflow
from ftddm_trt.workflows.deploy import DeployError, make_triton_repo
from ftddm_trt.workflows.export import int8_parity

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()

#: A calibration small enough for tests: one batch of 4 maps, a 4-step trajectory.
SMALL = CalibrationSettings(subjects=1, batches=1, batch_size=4, steps=4)
#: Two parity cells of 4 maps.
SMALL_PARITY = functools.partial(int8_parity, n_maps=4, cells=((16, "hr"), (16, "lr")))


def flat(text: str) -> str:
    return "".join(text.split())


def _feeds(name: str = "unet") -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in f.items()} for f in real_parity_inputs(name)]


@pytest.fixture(scope="module")
def quantized_unet(tiny_onnx_export, tmp_path_factory):
    """The tiny unet.onnx quantized (calibrated on the real-parity inputs) and its record."""
    out = tmp_path_factory.mktemp("int8") / "unet.int8.onnx"
    record = quantize_unet(tiny_onnx_export / "unet.onnx", out, CalibrationReader(_feeds()), SMALL)
    return out, record


@pytest.fixture(scope="module")
def tiny_int8_export(tiny_onnx_export, tiny_model_dir, tmp_path_factory):
    """The tiny model's int8 export, quantized from its fp32 export, with a small calibration and parity."""
    out = tmp_path_factory.mktemp("int8_export") / "onnx-int8"
    options = Int8Export(calibration=SMALL, parity=SMALL_PARITY, fp32_export=tiny_onnx_export)
    export_int8(ModelSet.open(tiny_model_dir), out, options, log=lambda _m: None)
    return out


# ------------------------------------------------------------------------------------------- graph


def test_conv_roles_are_found_from_the_graph(tiny_onnx_export):
    model = onnx.load(str(tiny_onnx_export / "unet.onnx"))
    roles = conv_roles(model)
    assert len(roles) == sum(n.op_type == "Conv" for n in model.graph.node)
    first = [n for n, r in roles.items() if "first" in r]
    last = [n for n, r in roles.items() if "last" in r]
    assert len(first) == 1 and len(last) == 1 and first != last
    by_name = {n.name: n for n in model.graph.node}
    assert by_name[last[0]].output[0] == "eps"
    if any(n.op_type == "MatMul" for n in model.graph.node):  # q, k, v and the output projection
        assert sum("attention" in r for r in roles.values()) >= 2


def test_quantized_graph_has_qdq_around_conv_and_keeps_the_embedding_fp32(quantized_unet):
    path, record = quantized_unet
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    nodes = model.graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    int8 = set(quantized_nodes(model))
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert record["quantized_convs"] == len([c for c in convs if c.name in int8]) == len(convs) - 2
    assert set(record["fp32_convs"]) == {c.name for c in convs if c.name not in int8}
    assert sorted(r for roles in record["fp32_convs"].values() for r in roles) == ["first", "last"]
    for conv in convs:
        if conv.name not in int8:
            continue
        data, weight = producers[conv.input[0]], producers[conv.input[1]]
        assert data.op_type == weight.op_type == "DequantizeLinear"
        # the output is quantized again for the next integer kernel
        assert {c.op_type for c in consumers[conv.output[0]]} == {"QuantizeLinear"}
        # weights: int8, one scale per output channel
        inits = {i.name: i for i in model.graph.initializer}
        w, scale = inits[weight.input[0]], inits[weight.input[1]]
        assert w.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [w.dims[0]]
    # the t and s embeddings (Sin/Cos up to the first Gemm) and the Gemms of the CIN MLP stay fp32
    embedding = [nodes[k] for k in embedding_node_indices(model)]
    assert {n.op_type for n in embedding} >= {"Sin", "Cos"}
    for n in embedding + [n for n in nodes if n.op_type == "Gemm"]:
        assert n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.name not in int8
        assert all(producers[i].op_type != "DequantizeLinear" for i in n.input if i in producers), n.name



def test_quantized_unet_is_close_to_fp32(tiny_onnx_export, quantized_unet):
    dev = int8_mod.eps_deviation(tiny_onnx_export / "unet.onnx", quantized_unet[0], _feeds())
    assert 0 < dev["eps_relative_error"] < 0.5 and 0 < dev["x0_relative_error"] < 0.1, dev


def test_calibration_reader_serves_ranges_and_iterates():
    feeds = [{"a": np.full(1, float(i), np.float32)} for i in range(5)]
    reader = CalibrationReader(feeds)
    assert len(reader) == 5 and [int(f["a"][0]) for f in reader] == [0, 1, 2, 3, 4] and reader.get_next() is None
    reader.set_range(1, 3)
    assert [int(f["a"][0]) for f in reader] == [1, 2]
    reader.rewind()
    assert reader.get_next() is feeds[0]


def test_calibration_settings_are_checked():
    with pytest.raises(ValueError, match="calibration method"):
        CalibrationSettings(method="mse")
    with pytest.raises(ValueError, match="conv roles"):
        CalibrationSettings(fp32_conv_roles=("middle",))
    with pytest.raises(ValueError, match="batches"):
        CalibrationSettings(batches=0)
    record = CalibrationSettings(data=Path("/site/train")).record()
    assert record["source"] == "/site/train" and "styles" not in record
    assert CalibrationSettings().record()["source"] == "phantoms"


# ---------------------------------------------------------------------------------------- the export


def test_int8_export_manifest_records_precision_calibration_and_db_parity(tiny_int8_export, tiny_onnx_export,
                                                                          tiny_model_dir):
    manifest = json.loads((tiny_int8_export / "manifest.json").read_text())
    fp32 = json.loads((tiny_onnx_export / "manifest.json").read_text())
    assert sorted(p.name for p in tiny_int8_export.iterdir()) == [
        ".ftddm-trt.json", "flow.onnx", "manifest.json", "unet.onnx", "unet_full.onnx"]
    assert manifest["precision"] == "int8"
    assert manifest["model_hashes"] == fp32["model_hashes"] == ModelSet.open(tiny_model_dir).hashes()
    assert manifest["flow_ttrunc"] == fp32["flow_ttrunc"]
    nets = manifest["networks"]
    assert {n: i["precision"] for n, i in nets.items()} == {"unet": "int8", "unet_full": "int8", "flow": "fp32"}
    assert nets["flow"]["onnx_sha256"] == fp32["networks"]["flow"]["onnx_sha256"]
    for name in ("unet", "unet_full"):
        info = nets[name]
        assert info["onnx_sha256"] == file_sha256(tiny_int8_export / info["onnx"]) != info["fp32_onnx_sha256"]
        assert info["fp32_onnx_sha256"] == fp32["networks"][name]["onnx_sha256"]
        assert info["model_sha256"] == fp32["networks"][name]["model_sha256"]
        assert [i["name"] for i in info["inputs"]] == ["x_t", "y", "t", "s"]
        assert info["inputs"][0]["shape"] == ["batch", 1, 64, 64] and info["inputs"][0]["dtype"] == "float32"
        assert info["int8"]["quantized_ops"] == ["Conv"] and info["int8"]["quantized_convs"] > 0
        assert info["int8"]["calibration_batches"] == SMALL.batches * SMALL.steps
        assert np.isfinite(info["int8"]["check"]["eps_relative_error"])
    calib = manifest["int8"]["calibration"]
    assert calib["source"] == "phantoms" and calib["method"] == "percentile" and calib["seed"] == 0
    assert calib["batches"] == 1 and calib["steps"] == 4 and calib["batch_size"] == 4
    assert any("embedding" in k for k in manifest["int8"]["kept_fp32"])
    parity = manifest["int8"]["parity"]
    assert parity["sampler"]["name"] == "ftddm-dpmpp" and parity["sampler"]["tau_f"] == 0.0
    assert [(c["n"], c["protocol"]) for c in parity["cells"]] == [(16, "hr"), (16, "lr")]
    for cell in parity["cells"]:
        assert np.isfinite([cell["psnr_fp32_db"], cell["psnr_int8_db"]]).all() and cell["maps"] > 0
        assert cell["difference_db"] == pytest.approx(cell["psnr_int8_db"] - cell["psnr_fp32_db"], abs=1e-9)
    assert parity["worst_cell_difference_db"] == min(c["difference_db"] for c in parity["cells"])
    assert parity["worst_cell_difference_db"] >= -parity["max_loss_db"]


def test_backend_opens_an_int8_export_and_reports_its_precision(tiny_int8_export, tiny_onnx_export, tiny_model_dir):
    with OnnxRuntimeBackend(tiny_int8_export) as b8, OnnxRuntimeBackend(tiny_onnx_export) as b32:
        facts = b8.describe()
        assert facts["precision"] == "int8" and b32.describe()["precision"] == "fp32"
        assert facts["network_precision"] == {"unet": "int8", "unet_full": "int8", "flow": "fp32"}
        # the same weights: the model check that upscale runs passes
        check_same_model(ModelSet.open(tiny_model_dir).hashes(), facts["models"], ["unet", "unet_full", "flow"],
                         "the export", "the tiny model")
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(3, 1, 64, 64, generator=g), torch.rand(3, 4, 64, 64, generator=g)
        t, s = torch.tensor([1.0, 50.0, 100.0]), torch.tensor([2.0, 4.0, 8.0])
        for full in (False, True):
            a, b = b8.unet(x, y, t, s, full=full), b32.unet(x, y, t, s, full=full)
            assert torch.isfinite(a).all() and float((a - b).norm() / b.norm()) < 0.5


@pytest.mark.e2e
def test_int8_export_upscales_a_phantom_close_to_fp32(tiny_int8_export, tiny_onnx_export, tiny_model_dir,
                                                      phantom_subject_dir, tmp_path):
    import nibabel as nib

    outs = {}
    for label, export in (("int8", tiny_int8_export), ("fp32", tiny_onnx_export)):
        out = tmp_path / label
        res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--onnx", str(export),
                                  "--model", str(tiny_model_dir), "--metabolites", "NAA", "--seed", "1"])
        assert res.exit_code == 0, res.output
        outs[label] = np.asarray(nib.load(str(out / "concs" / "raw" / "NAA.nii.gz")).dataobj)
        record = json.loads((out / "run.json").read_text())
        assert record["backend"]["precision"] == label
    a, b = outs["int8"], outs["fp32"]
    assert np.isfinite(a).all() and a.max() > 0
    # a loose bound: the tiny random networks amplify no error this much unless the graph is broken
    assert float(np.linalg.norm(a - b) / np.linalg.norm(b)) < 0.25


def test_a_loss_beyond_the_limit_is_refused_and_nothing_written(tiny_onnx_export, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    def lossy(fp32_dir, int8_dir, pool):
        return {"cells": [], "mean_difference_db": -0.8, "worst_cell_difference_db": -0.8}

    monkeypatch.setattr(int8_mod, "trajectory_feeds", lambda src, pool, settings, t_max: _feeds())
    out = tmp_path / "int8"
    options = Int8Export(calibration=SMALL, parity=lossy, fp32_export=tiny_onnx_export)
    with pytest.raises(Int8Error, match=r"lose 0.80 dB .*more than 0.5 dB"):
        export_int8(ModelSet.open(tiny_model_dir), out, options, log=lambda _m: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_fp32_export_of_other_weights_is_refused(tiny_onnx_export, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny_model_set

    other = build_tiny_model_set(tmp_path / "other", seed=5)
    with pytest.raises(Int8Error, match="other weights"):
        export_int8(ModelSet.open(other), tmp_path / "out", Int8Export(calibration=SMALL, fp32_export=tiny_onnx_export),
                    log=lambda _m: None)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ refusals


def test_tensorrt_and_triton_refuse_an_int8_export(tiny_int8_export, tmp_path):
    with pytest.raises(UnsupportedPrecision, match="int8 export.*build-engine takes fp32 exports only"):
        build_engines(tiny_int8_export, tmp_path / "engines")
    assert "tensorrt" not in sys.modules and not (tmp_path / "engines").exists()
    res = runner.invoke(app, ["build-engine", "--onnx", str(tiny_int8_export), "--out", str(tmp_path / "engines")])
    assert res.exit_code == 2 and "without --int8" in flat(res.output).replace("without--int8", "without --int8")
    with pytest.raises(DeployError, match="Triton repository takes fp32 exports only"):
        make_triton_repo(tmp_path / "repo", "cpu", tiny_int8_export, None, None, None)
    res = runner.invoke(app, ["triton-repo", "--out", str(tmp_path / "repo"), "--onnx", str(tiny_int8_export)])
    assert res.exit_code == 2 and "int8export" in flat(res.output)
    assert not (tmp_path / "repo").exists()


def test_export_cli_int8_options(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def fake_export_int8(models, out, options, force=False, log=print, flow_ttrunc=None):
        calls.append((models.root, out, options))
        return {"precision": "int8", "networks": {"unet": {}}, "flow_ttrunc": 100}

    monkeypatch.setattr(export_workflow, "export_int8", fake_export_int8)
    out = tmp_path / "onnx"
    res = runner.invoke(app, ["export", "--out", str(out), "--model", str(tiny_model_dir), "--int8"])
    assert res.exit_code == 0, res.output and "int8" in res.output
    (root, got_out, options), = calls
    assert got_out == out and options.calibration.data is None and options.parity is int8_parity
    data = tmp_path / "site"
    data.mkdir()
    res = runner.invoke(app, ["export", "--out", str(out), "--model", str(tiny_model_dir), "--int8",
                              "--calibration-data", str(data)])
    assert res.exit_code == 0, res.output
    assert calls[-1][2].calibration.data == data and calls[-1][2].calibration.source == str(data)

    res = runner.invoke(app, ["export", "--out", str(out), "--model", str(tiny_model_dir),
                              "--calibration-data", str(data)])
    assert res.exit_code == 2 and "give --int8 with it" in " ".join(res.output.split())
    res = runner.invoke(app, ["export", "--out", str(out), "--model", str(tiny_model_dir), "--int8",
                              "--calibration-data", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "is not a folder" in " ".join(res.output.split())
    assert len(calls) == 2


def test_a_site_folder_too_small_to_calibrate_is_refused_by_name(tiny_model_dir, tmp_path):
    data = tmp_path / "site"
    (data / "sub-001").mkdir(parents=True)
    res = runner.invoke(app, ["export", "--out", str(tmp_path / "onnx"), "--model", str(tiny_model_dir), "--int8",
                              "--calibration-data", str(data)])
    assert res.exit_code == 2, res.output
    assert "site" in flat(res.output) and "Traceback" not in res.output
    assert not (tmp_path / "onnx").exists()
    shutil.rmtree(data)


def test_a_site_training_folder_calibrates_and_its_last_subject_is_held_out(tiny_onnx_export, tiny_model_dir,
                                                                           tmp_path):
    from ftddm_trt.data.nifti.write import write_training_subject
    from ftddm_trt.data.phantom import make_subject

    data = tmp_path / "site"
    for i in range(2):
        write_training_subject(data, make_subject(i, 11, style="smooth"))
    settings = CalibrationSettings(data=data, batches=1, batch_size=4, steps=4)
    calib, held = int8_mod.calibration_pools(settings)
    assert len(calib) > 0 and len(held) > 0  # one subject each (the last one held out)
    assert calib.maps.shape != held.maps.shape or not np.array_equal(calib.maps, held.maps)
    out = tmp_path / "int8"
    manifest = export_int8(ModelSet.open(tiny_model_dir), out, Int8Export(
        calibration=settings, parity=functools.partial(int8_parity, n_maps=2, cells=((16, "hr"),)),
        fp32_export=tiny_onnx_export), log=lambda _m: None)
    assert manifest["int8"]["calibration"]["source"] == str(data)
    assert manifest["int8"]["parity"]["maps_per_cell"] == 2
    assert json.loads((out / "manifest.json").read_text()) == manifest
