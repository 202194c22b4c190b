"""Export a model set to ONNX, clean the graphs, check parity with PyTorch, write a manifest.

Graphs (dynamic batch ``B``; every other dimension fixed, and written into the graph's metadata):

- ``unet.onnx`` / ``unet_full.onnx``: ``x_t (B,1,64,64), y (B,4,64,64), t (B,), s (B,) -> eps (B,1,64,64)``
- ``flow.onnx`` (the flow's reverse pass): ``eps (B,1,64,64), y (B,4,64,64), tau_f (B,) -> x (B,1,64,64)``
- ``munet.onnx`` (baseline): ``y (B,4,64,64), s (B,) -> x0 (B,1,64,64)``
- ``flow_enhancer.onnx`` (baseline, the enhancer's reverse pass):
  ``eps (B,1,64,64), y (B,4,64,64), x_munet (B,1,64,64), tau_f (B,) -> x (B,1,64,64)``

torch's dynamo exporter at opset 18 (at opset 17 it can write an invalid Split),
then onnxslim (constant folding, dead-node removal, shape inference). The export is written into a
temporary folder and moved into place only when every network passed its parity check.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from ftddm_trt import __version__
from ftddm_trt.atomic import atomic_dir
from ftddm_trt.constants import HR_SIZE, T_DIFFUSION, T_TRUNC, TRAINED_LR_SIZES
from ftddm_trt.export.manifest import FLOW_TTRUNC_KEY, file_sha256, resolve_flow_ttrunc, write_manifest
from ftddm_trt.models import EnhancerReverse, FlowReverse
from ftddm_trt.models.model_set import ModelSet

OPSET = 18
MAX_BATCH = 128
PARITY_BATCHES = (1, 3, 8)
#: fp32 ONNX Runtime vs fp32 PyTorch: kernels differ in summation order only.
PARITY_ATOL = 2e-3


@dataclass(frozen=True)
class TensorSpec:
    """One graph tensor: its name and its shape without the batch dimension."""

    name: str
    shape: tuple[int, ...]  # without the batch dimension

    def with_batch(self, b: int) -> tuple[int, ...]:
        """The full shape for a batch of ``b``."""
        return (b, *self.shape)


IMG = (1, HR_SIZE, HR_SIZE)
COND = (4, HR_SIZE, HR_SIZE)
UNET_IO = (
    [TensorSpec("x_t", IMG), TensorSpec("y", COND), TensorSpec("t", ()), TensorSpec("s", ())],
    [TensorSpec("eps", IMG)],
)
FLOW_IO = ([TensorSpec("eps", IMG), TensorSpec("y", COND), TensorSpec("tau_f", ())], [TensorSpec("x", IMG)])
MUNET_IO = ([TensorSpec("y", COND), TensorSpec("s", ())], [TensorSpec("x0", IMG)])
ENHANCER_IO = (
    [TensorSpec("eps", IMG), TensorSpec("y", COND), TensorSpec("x_munet", IMG), TensorSpec("tau_f", ())],
    [TensorSpec("x", IMG)],
)
NETWORK_IO = {"unet": UNET_IO, "unet_full": UNET_IO, "flow": FLOW_IO, "munet": MUNET_IO, "flow_enhancer": ENHANCER_IO}


class ParityError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""


def exportable(name: str, net: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward is the exported graph of network ``name``."""
    if name == "flow":
        return FlowReverse(net).eval()
    if name == "flow_enhancer":
        return EnhancerReverse(net).eval()
    return net.eval()


def random_inputs(name: str, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Plausible random inputs: mask channel binary, t and s in their trained ranges."""
    inputs, _ = NETWORK_IO[name]
    feeds = {spec.name: torch.randn(spec.with_batch(batch), generator=gen) for spec in inputs}
    feeds["y"][:, 1] = (feeds["y"][:, 1] > 0).float()
    feeds["y"][:, 2:] = feeds["y"][:, 2:].abs().clamp(max=1)
    if "t" in feeds:
        t_max = T_DIFFUSION if name == "unet_full" else T_TRUNC
        feeds["t"] = torch.randint(1, t_max + 1, (batch,), generator=gen).float()
    if "s" in feeds:
        idx = torch.randint(0, len(TRAINED_LR_SIZES), (batch,), generator=gen)
        feeds["s"] = torch.tensor([HR_SIZE / TRAINED_LR_SIZES[i] for i in idx])
    if "x_munet" in feeds:  # a map estimate: non-negative, zero outside M
        feeds["x_munet"] = feeds["x_munet"].abs() * feeds["y"][:, 1:2]
    if "tau_f" in feeds:
        feeds["tau_f"] = torch.rand(batch, generator=gen)
    return feeds


#: torch's exporter logs warnings nobody can act on ("torchvision is not installed. Skipping ...").
NOISY_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "torch._export", "torch.fx.experimental")


@contextlib.contextmanager
def quiet_exporter():
    """Hide the exporter's routine warnings (log lines below ERROR, FutureWarning/DeprecationWarning, the
    "axis name ... will not be used" UserWarning) for the duration of one export. Errors still log,
    and exceptions propagate untouched."""
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_network(name: str, net: torch.nn.Module, path: Path) -> None:
    """Export one network to ``path`` with a dynamic batch dimension, then clean the graph."""
    inputs, outputs = NETWORK_IO[name]
    module = exportable(name, net)
    example = random_inputs(name, 2, torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = {spec.name: {0: batch} for spec in inputs}
    with torch.no_grad(), quiet_exporter():
        torch.onnx.export(
            module,
            tuple(example[spec.name] for spec in inputs),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_shapes=tuple(dynamic[spec.name] for spec in inputs),
            external_data=False,
            verbose=False,
        )
    model = onnx.load(str(path))
    model = clean_graph(model)
    set_io_shapes(model, inputs, outputs)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead-node elimination and shape inference (onnxslim)."""
    import onnxslim

    return onnxslim.slim(model)


def set_io_shapes(model: onnx.ModelProto, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Write the symbolic batch and the fixed dimensions into the graph's input/output metadata."""
    for values, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        by_name = {v.name: v for v in values}
        for spec in specs:
            dims = by_name[spec.name].type.tensor_type.shape.dim
            del dims[:]
            dims.add().dim_param = "batch"
            for size in spec.shape:
                dims.add().dim_value = size


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes and dtypes of a graph's inputs and outputs, as the metadata states them."""

    def describe(v: onnx.ValueInfoProto) -> dict[str, Any]:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def parity_check(
    name: str,
    net: torch.nn.Module,
    onnx_path: Path,
    real_inputs: list[dict[str, torch.Tensor]],
    batches: tuple[int, ...] = PARITY_BATCHES,
    atol: float | None = None,
) -> dict[str, Any]:
    """Max |ONNX Runtime - PyTorch| on random inputs at several batch sizes and on real inputs.

    Raises ParityError above ``atol`` (default: ``PARITY_ATOL`` at call time); returns the measured errors.
    """
    import onnxruntime as ort

    atol = PARITY_ATOL if atol is None else atol

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = exportable(name, net)
    gen = torch.Generator().manual_seed(1)
    cases = [(f"random_b{b}", random_inputs(name, b, gen)) for b in batches]
    cases += [(f"real_{i}", feeds) for i, feeds in enumerate(real_inputs)]
    errors: dict[str, float] = {}
    for label, feeds in cases:
        with torch.no_grad():
            ref = module(*feeds.values()).numpy()
        (out,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        if out.shape != ref.shape:
            raise ParityError(f"{name}: ONNX output shape {out.shape} != PyTorch {ref.shape} ({label})")
        errors[label] = float(np.max(np.abs(out - ref)))
    worst = max(errors.values())
    if not np.isfinite(worst) or worst > atol:
        raise ParityError(f"{name}: ONNX Runtime differs from PyTorch by {worst:.3g} > {atol:g} ({errors})")
    return {"max_abs_error": worst, "atol": atol, "cases": errors}


@functools.lru_cache(maxsize=1)
def _parity_pool():
    """The phantom slices parity inputs come from (one subject, made once per process)."""
    from ftddm_trt.data.examples import SlicePool
    from ftddm_trt.data.phantom import generate_dataset

    return SlicePool.from_subjects(generate_dataset(1, seed=99))


def real_parity_inputs(name: str, n_batches: int = 2, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    """Inputs built from phantom data the way the pipeline builds them (validation-style batches)."""
    from ftddm_trt.data.examples import fixed_batches

    pool = _parity_pool()
    gen = torch.Generator().manual_seed(2)
    out = []
    for b in fixed_batches(pool, n_batches * batch, batch, seed=3):
        if name == "flow":
            out.append(
                {"eps": torch.randn(b.x0.shape, generator=gen), "y": b.y, "tau_f": torch.full((b.y.shape[0],), 0.9)}
            )
        elif name == "munet":
            out.append({"y": b.y, "s": b.s})
        elif name == "flow_enhancer":  # a blurred truth stands in for MUNet's estimate
            blurred = torch.nn.functional.avg_pool2d(b.x0, 3, stride=1, padding=1) * b.mask
            out.append({"eps": torch.randn(b.x0.shape, generator=gen), "y": b.y, "x_munet": blurred,
                        "tau_f": torch.full((b.y.shape[0],), 0.9)})
        else:
            t_max = T_DIFFUSION if name == "unet_full" else T_TRUNC
            t = torch.randint(1, t_max + 1, (b.y.shape[0],), generator=gen).float()
            x_t = b.x0 + b.mask * torch.randn(b.x0.shape, generator=gen) * 0.3
            out.append({"x_t": x_t, "y": b.y, "t": t, "s": b.s})
    return out


def resolve_export_ttrunc(models: ModelSet, flow_ttrunc: int | None) -> int | None:
    """The flow Ttrunc an export of ``models`` records: the model's own record, else ``flow_ttrunc`` (a model
    that records another Ttrunc is refused with TtruncMismatch), else None."""
    return resolve_flow_ttrunc(models.flow_ttrunc(), flow_ttrunc, f"the model {models.root} ({models.flow_file})")


def export_into(models: ModelSet, folder: Path, ttrunc: int | None, log: Callable[[str], None] = print,
                check_parity: bool = True) -> dict[str, Any]:
    """Export every network of ``models`` into the existing ``folder``, check each against PyTorch
    (ParityError), write ``folder/manifest.json`` and return it. ``ttrunc``: from ``resolve_export_ttrunc``.
    ``check_parity=False`` (random weights for speed measurements only, whose outputs mean nothing) skips
    the check and records ``parity: null``."""
    nets = models.load_torch()
    hashes = models.hashes()
    manifest: dict[str, Any] = {FLOW_TTRUNC_KEY: ttrunc if "flow" in nets else None,
                                "ftddm_trt_version": __version__, "torch_version": torch.__version__,
                                "onnx_version": onnx.__version__, "opset": OPSET, "max_batch": MAX_BATCH,
                                "model_dir": str(models.root), "model_hashes": hashes, "networks": {}}
    for name, net in nets.items():
        path = folder / f"{name}.onnx"
        log(f"exporting {name} -> {path.name}")
        export_network(name, net, path)
        parity = parity_check(name, net, path, real_parity_inputs(name)) if check_parity else None
        if parity is not None:
            log(f"  parity {name}: max |ORT - torch| = {parity['max_abs_error']:.2e} (atol {parity['atol']:g})")
        manifest["networks"][name] = {
            "onnx": path.name,
            "onnx_sha256": file_sha256(path),
            "model_sha256": hashes[name],
            "config": models.config(name),
            **graph_io(onnx.load(str(path))),
            "parity": parity,
        }
    write_manifest(folder, manifest)
    return manifest


def export_model_set(
    models: ModelSet,
    out_dir: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    flow_ttrunc: int | None = None,
) -> dict[str, Any]:
    """Export every network of ``models`` into ``out_dir`` (``atomic.atomic_dir``: checked and locked
    before exporting; ``force`` replaces only a folder ftddm-trt wrote; never the model folder).

    The manifest records ``flow_ttrunc``, the Ttrunc the flow was trained for: the model's own record,
    else ``flow_ttrunc`` (a model that records another Ttrunc is refused with TtruncMismatch), else null.
    """
    ttrunc = resolve_export_ttrunc(models, flow_ttrunc)
    with atomic_dir(Path(out_dir), force=force, inputs=(models.root,), command="export") as tmp:
        return export_into(models, tmp, ttrunc, log)
