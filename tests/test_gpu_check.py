"""benchmarks/gpu_check.py: refuses cleanly without a GPU, imports nothing the bare GPU host lacks,
and its pure parts (synthetic inputs, PSNR, the safetensors fallback) are right."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
#: Packages a bare GPU host may lack: the check must run without them.
ABSENT_THERE = ("nibabel", "nilearn", "scipy", "typer", "rich", "tritonclient", "safetensors", "matplotlib",
                "onnxscript", "onnxslim", "skimage", "diffusers")

_BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for the test: ' + name)
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_at_once_without_a_gpu(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_imports_and_reads_the_shipped_model_without_the_absent_packages():
    code = _BLOCKER.format(blocked=set(ABSENT_THERE)) + """
sys.path.insert(0, 'benchmarks')
import gpu_check
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
from ftddm_trt.export.onnx_export import random_inputs
from ftddm_trt.models.io import save_file
assert save_file is None
y, s, truth, mask = gpu_check.synthetic_batch(2)
b = TorchBackend(ModelSet.open())
x, nfe = sample_images(b, SamplerSpec('ftddm-dpmpp', steps=2), y, s, batch_size=2)
assert nfe == 3 and x.shape == (2, 1, 64, 64)
bad = [m for m in sys.modules if m.split('.')[0] in {blocked!r}]
assert not bad, bad
print('ok')
""".format(blocked=set(ABSENT_THERE))
    res = _run(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_plain_safetensors_reader_matches_the_package():
    from safetensors.torch import load_file

    from ftddm_trt.models import safetensors_plain
    from ftddm_trt.models.model_set import SHIPPED_MODEL_DIR

    for name in ("unet", "flow"):
        a = load_file(str(SHIPPED_MODEL_DIR / f"{name}.safetensors"))
        b = safetensors_plain.load_file(SHIPPED_MODEL_DIR / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])


def test_synthetic_inputs_and_psnr():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    y, s, truth, mask = gpu_check.synthetic_batch(3, seed=0)
    assert y.shape == (3, 4, 64, 64) and s.tolist() == [4.0, 4.0, 4.0]
    assert torch.equal(y[:, 1] > 0.5, torch.from_numpy(mask))
    assert (truth[~mask] == 0).all() and truth[mask].min() > 0
    assert gpu_check.psnr(truth, truth + 0.0, mask) > 150  # identical: huge PSNR
    noisy = truth + 0.1 * mask
    expected = np.mean([10 * np.log10(t[m].max() ** 2 / 0.01) for t, m in zip(truth, mask)])
    assert gpu_check.psnr(noisy, truth, mask) == pytest.approx(expected, rel=1e-6)
    md = gpu_check.markdown({"machine": {"gpu": "X", "torch": "t", "cuda": "c", "python": "p"}, "seconds": 1.0,
                             "sections": {"samplers": {"skipped": "time budget"}}})
    assert "not measured: time budget" in md
