"""Packaging (issue 12): the Triton templates and model code ship inside the wheel and are found from an
installed copy outside the source tree; the code parses as Python 3.10 (requires-python >= 3.10)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["ftddm_trt/serving/triton_templates/templates/network.pbtxt.in",
           "ftddm_trt/serving/triton_templates/templates/sampler.pbtxt.in",
           "ftddm_trt/serving/triton_templates/python/onnx_network.py",
           "ftddm_trt/serving/triton_templates/python/sampler.py"]


def test_requires_python_is_widened():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10,<3.14"' in text


def test_package_parses_as_python_3_10():
    for path in sorted((ROOT / "ftddm_trt").rglob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))


@pytest.mark.slow
def test_wheel_ships_the_triton_templates_and_finds_them_installed(tmp_path):
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = wheels.glob("ftddm_trt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [f for f in SHIPPED if f not in names]
        assert not missing, f"not in the wheel: {missing}"
        assert any(n.endswith(".dist-info/METADATA") and "Requires-Python: <3.14,>=3.10" in z.read(n).decode()
                   for n in names)
        site = tmp_path / "site"
        z.extractall(site)
    # installed copy, outside the source tree: the locator must find the templates inside it
    code = ("import ftddm_trt, ftddm_trt.serving.repository.render as r; "
            "from ftddm_trt.serving.repository.render import default_network_io, network_config; "
            "ins, outs = default_network_io('unet'); text = network_config('unet', 'cpu', ins, outs); "
            "print(ftddm_trt.__file__); print(r.TRITON_REPO_SRC); print('ftddm_unet' in text)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FTDDM_TRITON_REPO_SRC")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**env, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    pkg_file, templates, ok = out.stdout.split()
    assert Path(pkg_file).is_relative_to(site) and Path(templates).is_relative_to(site) and ok == "True"
    assert not Path(templates).is_relative_to(ROOT)
