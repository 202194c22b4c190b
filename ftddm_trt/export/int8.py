"""int8 UNet graphs: ONNX Runtime static quantization (QDQ), calibrated on the model's own data.

What is quantized: ``Conv`` only. Weights int8, symmetric, one scale per output channel; activations uint8,
asymmetric, one scale per tensor; a QuantizeLinear/DequantizeLinear pair stands before and after each
quantized Conv (QDQ format), so ONNX Runtime's CPU provider runs it as an integer convolution.

What stays fp32, by construction of the op list: the t and s sinusoidal embeddings and the CIN MLP (``Sin``,
``Cos``, ``Gemm``), every ``InstanceNormalization``, SiLU, the attention products and softmax (``MatMul``,
``Softmax``), ``Resize`` and the residual adds. Among the convolutions, the roles named by ``FP32_CONV_ROLES``
stay fp32 too (found from the graph, never from node names; see ``conv_roles``): the first (it reads x_t and
the condition y, whose fine detail the output is made of) and the last (it writes eps, from which the sampler
takes ``x0 = (x_t - sqrt(1 - gamma_t) eps) / sqrt(gamma_t)``).

Calibration (``CalibrationReader``): the inputs the fp32 graph sees along its own sampling trajectories.
Maps of the model's own data (phantoms of the styles the shipped model was trained on, or a site's
training folder, ``data.training_folder``) are made into conditions at every acquisition size and both
mask protocols (``data.examples.fixed_batches``); each batch starts at ``t_max`` (Ttrunc for ``unet``,
T for ``unet_full``) from ``q(x_t | x0)`` and is run through DPM-Solver++ (20 steps, the default sampler's)
by the fp32 graph; every evaluation's ``(x_t, y, t, s)`` is one calibration batch. Activation ranges are
the ``percentile`` of each tensor's histogram (outliers clipped rather than stretching the scale).

``export_int8`` writes an export folder like ``onnx_export.export_model_set`` (same manifest, same
hashes of the weights), with int8 ``unet.onnx`` / ``unet_full.onnx`` and the fp32 ``flow.onnx``; the
manifest records each network's precision, the calibration and what was kept fp32, and the quality
parity in dB that the caller measures (``parity``: the sampler runs in the engine layer, above this one).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from ftddm_trt.atomic import atomic_dir
from ftddm_trt.constants import T_DIFFUSION, T_TRUNC
from ftddm_trt.data.examples import SlicePool, fixed_batches
from ftddm_trt.data.phantom import make_subject
from ftddm_trt.data.training_folder import read_training_folder
from ftddm_trt.diffusion import CosineSchedule, dpm_solver_pp_sample
from ftddm_trt.export.fp16 import tensor_consumers
from ftddm_trt.export.manifest import (
    file_sha256,
    manifest_flow_ttrunc,
    manifest_precision,
    read_manifest,
    resolve_flow_ttrunc,
    write_manifest,
)
from ftddm_trt.export.onnx_export import export_into, graph_io, real_parity_inputs, resolve_export_ttrunc
from ftddm_trt.integrity import verify_networks
from ftddm_trt.models.model_set import ModelSet

#: Networks an int8 export quantizes; the others (the flow) are copied in fp32.
INT8_NETWORKS: tuple[str, ...] = ("unet", "unet_full")
#: Op types that get int8 weights and activations.
QUANTIZED_OPS: tuple[str, ...] = ("Conv",)
#: Roles of convolutions kept fp32 (``conv_roles``): ``first``, ``last``, ``attention``.
FP32_CONV_ROLES: tuple[str, ...] = ("first", "last")
CONV_ROLES: tuple[str, ...] = ("first", "last", "attention")
#: Calibration methods (ONNX Runtime's), by the name the manifest records.
CALIBRATION_METHODS: tuple[str, ...] = ("percentile", "minmax", "entropy")
#: What the manifest says the calibration maps are when no folder was given.
PHANTOMS = "phantoms"
#: Styles of the phantoms calibration draws (those the shipped model was trained on).
CALIBRATION_STYLES: tuple[str, ...] = ("classic", "smooth", "patchy")


class Int8Error(RuntimeError):
    """An int8 export that cannot be made (quantization failed, or its output is not finite)."""


@dataclass(frozen=True)
class CalibrationSettings:
    """Where calibration maps come from and how many trajectories are recorded.

    ``data``: a site's training folder (``data.training_folder`` layout; every subject but the last); None:
    ``subjects`` phantoms of ``CALIBRATION_STYLES`` drawn with ``seed``. ``batches`` batches of ``batch_size``
    maps each run one DPM-Solver++ trajectory of ``steps`` steps: ``batches * steps`` calibration batches
    per network.
    ``percentile``: the share of each activation's histogram the int8 range covers (``percentile`` method)."""

    data: Path | None = None
    subjects: int = 2
    batches: int = 4
    batch_size: int = 8
    steps: int = 20
    method: str = "percentile"
    percentile: float = 99.9
    seed: int = 0
    fp32_conv_roles: tuple[str, ...] = FP32_CONV_ROLES

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")
        unknown = set(self.fp32_conv_roles) - set(CONV_ROLES)
        if unknown:
            raise ValueError(f"unknown conv roles {sorted(unknown)}; choose from {', '.join(CONV_ROLES)}")
        for name in ("subjects", "batches", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"calibration {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    @property
    def source(self) -> str:
        """``phantoms`` or the training folder, as the manifest records it."""
        return PHANTOMS if self.data is None else str(self.data)

    def record(self) -> dict[str, Any]:
        """The settings as the manifest records them."""
        d = asdict(self)
        d["data"] = None if self.data is None else str(self.data)
        d["source"] = self.source
        d["fp32_conv_roles"] = list(self.fp32_conv_roles)
        if self.data is None:
            d["styles"] = list(CALIBRATION_STYLES)
        return d


# --------------------------------------------------------------------------------------------- maps


def calibration_pools(settings: CalibrationSettings) -> tuple[SlicePool, SlicePool]:
    """(maps to calibrate on, held-out maps of the same source for the parity check).

    Phantoms: ``settings.subjects`` subjects of the training styles for calibration, one more subject
    (drawn with another seed) held out. A training folder: every subject but the last for calibration, the
    last held out."""
    if settings.data is None:
        calib = [make_subject(i, seed=settings.seed, style=CALIBRATION_STYLES[i % len(CALIBRATION_STYLES)])
                 for i in range(settings.subjects)]
        held = [make_subject(0, seed=settings.seed + 1, style=CALIBRATION_STYLES[0])]
        return SlicePool.from_subjects(calib), SlicePool.from_subjects(held)
    subjects = read_training_folder(settings.data)
    return SlicePool.from_subjects(subjects[:-1]), SlicePool.from_subjects(subjects[-1:])


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def trajectory_feeds(fp32_onnx: Path, pool: SlicePool, settings: CalibrationSettings, t_max: int
                     ) -> list[dict[str, np.ndarray]]:
    """The fp32 graph's inputs along DPM-Solver++ trajectories from ``t_max`` (see the module docstring):
    ``settings.batches * settings.steps`` feeds ``{x_t, y, t, s}`` of ``settings.batch_size`` maps each."""
    sess = _session(fp32_onnx)
    schedule = CosineSchedule(T_DIFFUSION)
    gen = torch.Generator().manual_seed(settings.seed)
    batches = fixed_batches(pool, settings.batches * settings.batch_size, settings.batch_size, seed=settings.seed)
    feeds: list[dict[str, np.ndarray]] = []
    for b in batches:
        y, s = b.y.numpy(), b.s.numpy()

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            feed = {"x_t": np.array(x_t.numpy(), np.float32), "y": y,  # copies: the solver may reuse its tensors
                    "t": np.array(t.numpy(), np.float32), "s": s}
            feeds.append(feed)
            return torch.from_numpy(sess.run(None, feed)[0])

        gamma = float(schedule.gammas[t_max])
        x_start = (gamma**0.5 * b.x0 + (1 - gamma) ** 0.5 * torch.randn(b.x0.shape, generator=gen)) * b.mask
        dpm_solver_pp_sample(eps_fn, x_start, b.mask, schedule, t_start=t_max, steps=min(settings.steps, t_max),
                             clip=(0.0, 3.0))
    return feeds


class CalibrationReader:
    """ONNX Runtime's calibration data reader over a list of feeds (with ``set_range``, so that the
    calibrator collects its histograms in strides and never holds every activation at once)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.start, self.end = 0, len(feeds)
        self.pos = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve feeds ``start_index .. end_index - 1`` next."""
        self.start, self.end, self.pos = start_index, min(end_index, len(self.feeds)), start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed, or None at the end of the range."""
        if self.pos >= self.end:
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def __iter__(self):
        """Every feed of the current range (ONNX Runtime's debugging helpers iterate readers)."""
        while (feed := self.get_next()) is not None:
            yield feed

    def rewind(self) -> None:
        """Serve every feed again from the first."""
        self.set_range(0, len(self.feeds))


# ------------------------------------------------------------------------------------ graph structure


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {o: k for k, n in enumerate(graph.node) for o in n.output if o}


def conv_roles(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Conv node name -> its roles, found by walking the graph (a walk stops at the next Conv):

    - ``first``: reached from the graph input ``x_t``;
    - ``last``: reaches a graph output;
    - ``attention``: feeds an activation-by-activation ``MatMul`` (q, k, v) or is fed by one (the output
      projection)."""
    graph = model.graph
    nodes = graph.node
    consumers, producers = tensor_consumers(graph), _producers(graph)
    constants = {i.name for i in graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    outputs = {o.name for o in graph.output}

    def act_matmul(k: int) -> bool:
        return nodes[k].op_type == "MatMul" and not any(i in constants for i in nodes[k].input)

    roles: dict[str, set[str]] = {n.name: set() for n in nodes if n.op_type == "Conv"}
    # forward from x_t to the first Convs
    seen: set[int] = set()
    frontier = ["x_t"]
    while frontier:
        for k in consumers.get(frontier.pop(), []):
            if k in seen:
                continue
            seen.add(k)
            if nodes[k].op_type == "Conv":
                roles[nodes[k].name].add("first")
            else:
                frontier.extend(o for o in nodes[k].output if o)
    for k, node in enumerate(nodes):
        if node.op_type != "Conv":
            continue
        # forward: a graph output or an attention product before the next Conv
        seen, frontier = set(), [o for o in node.output if o]
        while frontier:
            tensor = frontier.pop()
            if tensor in outputs:
                roles[node.name].add("last")
            for j in consumers.get(tensor, []):
                if j in seen or nodes[j].op_type == "Conv":
                    continue
                seen.add(j)
                if act_matmul(j):
                    roles[node.name].add("attention")
                frontier.extend(o for o in nodes[j].output if o)
        # backward from the data input: an attention product before the previous Conv
        seen, frontier = set(), [node.input[0]]
        while frontier:
            j = producers.get(frontier.pop())
            if j is None or j in seen or nodes[j].op_type == "Conv":
                continue
            seen.add(j)
            if act_matmul(j):
                roles[node.name].add("attention")
            frontier.extend(i for i in nodes[j].input if i and i not in constants)
    return roles


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the ``QUANTIZED_OPS`` nodes of a QDQ graph whose data and weight inputs are both dequantized
    (ONNX Runtime runs them as integer kernels)."""
    producers = _producers(model.graph)
    nodes = model.graph.node
    out = []
    for n in nodes:
        if n.op_type not in QUANTIZED_OPS:
            continue
        ins = [producers.get(i) for i in n.input[:2] if i]
        if ins and all(k is not None and nodes[k].op_type == "DequantizeLinear" for k in ins):
            out.append(n.name)
    return out


def _name_nodes(model: onnx.ModelProto) -> None:
    used: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{i}"
            while node.name in used:
                node.name += "_"
        used.add(node.name)


def quantize_unet(fp32_onnx: Path, out_onnx: Path, reader: CalibrationReader,
                  settings: CalibrationSettings = CalibrationSettings()) -> dict[str, Any]:
    """Quantize the UNet graph ``fp32_onnx`` into ``out_onnx`` (QDQ, Conv only, per-channel int8 weights,
    uint8 activations calibrated on ``reader``); returns what was done, for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax,
              "entropy": CalibrationMethod.Entropy}[settings.method]
    with tempfile.TemporaryDirectory(prefix="ftddm-trt-int8-") as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        _name_nodes(model)
        onnx.save(model, str(pre))
        roles = conv_roles(model)
        keep = sorted(n for n, r in roles.items() if r & set(settings.fp32_conv_roles))
        reader.rewind()
        stride = max(1, min(16, len(reader)))
        while len(reader) % stride:
            stride -= 1
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibTensorRangeSymmetric": False,
                 "CalibStridedMinMax": stride, "CalibPercentile": settings.percentile}
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its histogram settings
            quantize_static(str(pre), str(out_onnx), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=keep, calibrate_method=method, extra_options=extra)
    quant = onnx.load(str(out_onnx))
    onnx.checker.check_model(quant)
    int8 = quantized_nodes(quant)
    convs = sorted(roles)
    return {"quantized_ops": list(QUANTIZED_OPS), "quantized_convs": len([n for n in convs if n in int8]),
            "convs": len(convs), "fp32_convs": {n: sorted(roles[n]) for n in keep},
            "weights": "int8 symmetric per output channel", "activations": "uint8 asymmetric per tensor",
            "format": "QDQ", "calibration_batches": len(reader)}


#: What an int8 export keeps in fp32 besides the excluded convolutions (recorded in the manifest).
KEPT_FP32 = ("t and s embeddings and the CIN MLP (Sin, Cos, Gemm)", "InstanceNormalization", "SiLU",
             "attention products and softmax (MatMul, Softmax)", "Resize", "residual adds", "the flow network")


def eps_deviation(fp32_onnx: Path, int8_onnx: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Relative error of the int8 graph's eps against the fp32 graph's on ``feeds`` (||d|| / ||eps||), and
    of the implied x0 inside the mask (``x0 = (x_t - sqrt(1 - gamma_t) eps) / sqrt(gamma_t)``)."""
    a, b = _session(fp32_onnx), _session(int8_onnx)
    gammas = CosineSchedule(T_DIFFUSION).gammas.numpy()
    num = den = num_x0 = den_x0 = 0.0
    for feed in feeds:
        (ea,), (eb,) = a.run(None, feed), b.run(None, feed)
        if not np.isfinite(eb).all():
            raise Int8Error("the int8 graph gives non-finite values on calibration inputs")
        num += float(((ea - eb) ** 2).sum())
        den += float((ea**2).sum())
        g = gammas[feed["t"].astype(np.int64)][:, None, None, None]
        mask = feed["y"][:, 1:2]
        x0 = (feed["x_t"] - np.sqrt(1 - g) * ea) / np.sqrt(g) * mask
        num_x0 += float((((np.sqrt(1 - g) / np.sqrt(g)) * (ea - eb) * mask) ** 2).sum())
        den_x0 += float((x0**2).sum())
    return {"eps_relative_error": (num / max(den, 1e-30)) ** 0.5,
            "x0_relative_error": (num_x0 / max(den_x0, 1e-30)) ** 0.5}


# ---------------------------------------------------------------------------------------- the export

#: ``parity(fp32_dir, int8_dir, held_out_pool) -> record``: the quality of the default sampler on real maps
#: with the fp32 and the int8 graphs (PSNR in dB), measured by the caller (workflows) and recorded as is.
ParityFn = Callable[[Path, Path, SlicePool], dict[str, Any]]


#: An int8 export whose default sampler loses more than this many dB against fp32 in some parity cell is refused.
MAX_LOSS_DB = 0.5


@dataclass
class Int8Export:
    """What ``export_int8`` needs besides the model: calibration settings, the dB parity measure (its record
    must hold ``worst_cell_difference_db``, int8 - fp32) and the largest loss accepted (None: not checked)."""

    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    parity: ParityFn | None = None
    max_loss_db: float | None = MAX_LOSS_DB
    #: An fp32 export of the same weights to quantize (verified first), instead of exporting the model again.
    fp32_export: Path | None = None
    #: The UNets to quantize (the others stay fp32).
    networks: tuple[str, ...] = INT8_NETWORKS


def _fp32_export(models: ModelSet, folder: Path, ttrunc: int | None, source: Path | None,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """The fp32 export of ``models`` in ``folder``: made there, or copied from ``source`` once its manifest
    names the same weights, Ttrunc and fp32 precision and its graphs match their hashes."""
    if source is None:
        return export_into(models, folder, ttrunc, log)
    manifest = read_manifest(source)
    where = f"the ONNX export {source}"
    if manifest_precision(manifest) != "fp32":
        raise Int8Error(f"{where} is not an fp32 export: quantize the fp32 one")
    if manifest.get("model_hashes") != models.hashes():
        raise Int8Error(f"{where} was made from other weights than the model {models.root}")
    resolve_flow_ttrunc(manifest_flow_ttrunc(manifest, where), ttrunc, where)
    verify_networks(source, manifest, list(manifest["networks"]))
    for info in manifest["networks"].values():
        shutil.copyfile(source / info["onnx"], folder / info["onnx"])
    write_manifest(folder, manifest)
    log(f"quantizing the fp32 export {source}")
    return manifest


def export_int8(models: ModelSet, out_dir: Path, options: Int8Export, force: bool = False,
                log: Callable[[str], None] = print, flow_ttrunc: int | None = None) -> dict[str, Any]:
    """Export ``models`` like ``export_model_set`` into ``out_dir``, with int8 UNet graphs.

    The fp32 export (parity-checked against PyTorch) is made in a temporary folder; each UNet is quantized
    from it, the flow copied; the manifest records ``precision`` per network, the calibration, what stayed fp32,
    the eps deviation on held-out inputs, and ``options.parity``'s dB record."""
    ttrunc = resolve_export_ttrunc(models, flow_ttrunc)
    settings = options.calibration
    inputs = (models.root, settings.data, options.fp32_export)
    with atomic_dir(Path(out_dir), force=force, inputs=inputs, command="export") as tmp:
        with tempfile.TemporaryDirectory(prefix="ftddm-trt-fp32-") as fp32_name:
            fp32 = Path(fp32_name)
            calib_pool, held_out = calibration_pools(settings)  # a folder's problems named before any export
            manifest = _fp32_export(models, fp32, ttrunc, options.fp32_export, log)
            for name, info in manifest["networks"].items():
                src = fp32 / info["onnx"]
                if name not in options.networks or name not in INT8_NETWORKS:
                    shutil.copyfile(src, tmp / info["onnx"])
                    info["precision"] = "fp32"
                    continue
                t_max = T_DIFFUSION if name == "unet_full" else T_TRUNC
                log(f"calibrating {name}: {settings.batches} x {settings.steps} batches of {settings.batch_size} "
                    f"maps ({settings.source}) ...")
                reader = CalibrationReader(trajectory_feeds(src, calib_pool, settings, t_max))
                dst = tmp / info["onnx"]
                record = quantize_unet(src, dst, reader, settings)
                held = trajectory_feeds(src, held_out, CalibrationSettings(
                    batches=1, batch_size=settings.batch_size, steps=settings.steps, seed=settings.seed + 1), t_max)
                record["check"] = eps_deviation(src, dst, held + [
                    {k: v.numpy() for k, v in f.items()} for f in real_parity_inputs(name)])
                log(f"  {name}: {record['quantized_convs']} of {record['convs']} convs int8; relative error on "
                    f"held-out inputs: eps {record['check']['eps_relative_error']:.3f}, "
                    f"x0 {record['check']['x0_relative_error']:.4f}")
                info.update({"precision": "int8", "fp32_onnx_sha256": info["onnx_sha256"],
                             "onnx_sha256": file_sha256(dst), "int8": record, **graph_io(onnx.load(str(dst)))})
            manifest["precision"] = "int8"
            quantized = [n for n, info in manifest["networks"].items() if info["precision"] == "int8"]
            manifest["int8"] = {"networks": quantized, "calibration": settings.record(),
                                "kept_fp32": list(KEPT_FP32)}
            write_manifest(tmp, manifest)
            if options.parity is not None:
                log("measuring the default sampler's quality with the fp32 and the int8 graphs ...")
                parity = options.parity(fp32, tmp, held_out)
                parity["max_loss_db"] = options.max_loss_db
                manifest["int8"]["parity"] = parity
                worst = float(parity["worst_cell_difference_db"])
                log(f"  PSNR int8 - fp32: mean {parity['mean_difference_db']:+.3f} dB, worst cell {worst:+.3f} dB")
                if options.max_loss_db is not None and not worst >= -options.max_loss_db:
                    raise Int8Error(
                        f"the int8 graphs lose {-worst:.2f} dB of PSNR against fp32 on held-out maps (more than "
                        f"{options.max_loss_db:g} dB): nothing written. Use the fp32 export (without --int8), or "
                        "calibrate on data closer to the model's (--calibration-data).")
                write_manifest(tmp, manifest)
    return manifest
