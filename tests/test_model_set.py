"""Model folders with flows for several truncation points: selection by Ttrunc and packaging."""

from __future__ import annotations

import json
import shutil

import pytest

from ftddm_trt.models.io import model_sha256
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.training.package import package_model


def _flow_run(folder, src_stem, ttrunc: int):
    """A finished flow run folder as the trainer leaves it (best weights + last/state.json)."""
    (folder / "last").mkdir(parents=True)
    for ext in (".safetensors", ".json"):
        shutil.copyfile(src_stem.with_suffix(ext), (folder / "best").with_suffix(ext))
    state = {"step": 10, "best_val": -1.0, "config": {"task": "flow", "preset": "tiny", "t_trunc": ttrunc}}
    (folder / "last" / "state.json").write_text(json.dumps(state))
    return folder


@pytest.fixture()
def two_flow_model(tiny_model_dir, tmp_path):
    runs = {name: _flow_run(tmp_path / f"run_{name}", tiny_model_dir / name, 100) for name in ("unet", "flow")}
    for name in runs:  # the unet run is only a source of weights here
        state = json.loads((runs[name] / "last" / "state.json").read_text())
        state["config"]["task"] = name
        (runs[name] / "last" / "state.json").write_text(json.dumps(state))
    extra = _flow_run(tmp_path / "run_flow50", tiny_model_dir / "unet_full", 50)  # distinct bytes stand in for a flow
    out = tmp_path / "model"
    manifest = package_model(runs, out, extra_flows=[extra])
    return out, manifest


def test_package_writes_extra_flow_with_its_hash(two_flow_model):
    out, manifest = two_flow_model
    assert (out / "flow_t50.safetensors").is_file()
    assert manifest["networks"]["flow_t50"]["sha256"] == model_sha256(out / "flow_t50")
    assert manifest["networks"]["flow_t50"]["train_config"]["t_trunc"] == 50


def test_open_selects_the_flow_for_ttrunc(two_flow_model):
    out, _ = two_flow_model
    main = ModelSet.open(out)
    assert main.flow_file == "flow" and main.flow_ttrunc() == 100
    assert ModelSet.open(out, 100).flow_file == "flow"
    t50 = ModelSet.open(out, 50)
    assert t50.flow_file == "flow_t50" and t50.flow_ttrunc() == 50
    assert t50.hashes()["flow"] == model_sha256(out / "flow_t50") != main.hashes()["flow"]
    assert main.flow_ttruncs() == [50, 100]


def test_open_refuses_a_ttrunc_without_a_flow(two_flow_model):
    out, _ = two_flow_model
    with pytest.raises(FileNotFoundError, match=r"no flow for Ttrunc = 20: its flows are trained at Ttrunc = 50, 100"):
        ModelSet.open(out, 20)


def test_package_refuses_a_non_flow_extra_run(tiny_model_dir, tmp_path):
    run = _flow_run(tmp_path / "run", tiny_model_dir / "unet", 50)
    state = json.loads((run / "last" / "state.json").read_text())
    state["config"]["task"] = "unet"
    (run / "last" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="not a flow training run"):
        package_model({"unet": run}, tmp_path / "m", extra_flows=[run])
    assert not (tmp_path / "m").exists()
