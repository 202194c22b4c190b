"""fp16 ONNX graphs with explicit casts, for strongly typed TensorRT networks (TensorRT 10 and 11).

TensorRT 11 removed the weakly typed precision API (``BuilderFlag.FP16``, per-layer precision), so an
fp16 engine is built from a graph that already says which tensors are fp16. The graph is converted by
onnxconverter-common's ``float16.convert_float_to_float16`` (inputs and outputs stay float32), and the
nodes that must stay in fp32 are given to it as a block list. They are found from the graph itself, never
from node names:

- by walking it forward from the per-item scalar inputs (``t``, ``s``; ``tau_f`` of the flow) up to
  the first ``Gemm`` / ``MatMul``: the sinusoidal embeddings. Their Sin/Cos arguments reach
  ``t * freq`` with ``t <= 1000``, where fp16's spacing (0.5 at 1000) errs by up to 0.4 rad;
- by op type: normalization and softmax (InstanceNorm statistics and attention logits overflow in
  fp16), reductions, and the ops of the flow's couplings whose error grows through the inverse
  (``Exp``, ``Log``, ``Div``, ``Pow``, ``Sqrt``, ``Reciprocal``).

Pure functions of an ``onnx.ModelProto``; no GPU needed (tested on CPU with ONNX Runtime).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx

#: Per-item scalar inputs whose embeddings are kept in fp32 (the UNet's t and s).
SCALAR_INPUTS: tuple[str, ...] = ("t", "s")
#: The walk from a scalar input stops at (and does not include) the first node of these types.
EMBEDDING_STOP_OPS = frozenset({"Gemm", "MatMul"})
#: Op types kept in fp32 wherever they occur.
FP32_OP_TYPES = frozenset({
    "InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceLogSumExp",
    "Exp", "Log", "Div", "Pow", "Sqrt", "Reciprocal", "Sin", "Cos",
})


def tensor_consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it."""
    out: dict[str, list[int]] = defaultdict(list)
    for k, node in enumerate(graph.node):
        for name in node.input:
            if name:
                out[name].append(k)
    return out


def embedding_node_indices(model: onnx.ModelProto, inputs: Iterable[str] = SCALAR_INPUTS) -> list[int]:
    """Indices of every node reachable forward from ``inputs`` before the first Gemm/MatMul on each path."""
    nodes = model.graph.node
    consumers = tensor_consumers(model.graph)
    present = {i.name for i in model.graph.input}
    frontier = [name for name in inputs if name in present]
    seen: set[int] = set()
    while frontier:
        tensor = frontier.pop()
        for k in consumers.get(tensor, []):
            if k in seen or nodes[k].op_type in EMBEDDING_STOP_OPS:
                continue
            seen.add(k)
            frontier.extend(o for o in nodes[k].output if o)
    return sorted(seen)


def fp32_node_indices(model: onnx.ModelProto) -> list[int]:
    """Indices of the nodes an fp16 graph keeps in fp32: the scalar embeddings plus ``FP32_OP_TYPES``."""
    keep = set(embedding_node_indices(model))
    return [k for k, n in enumerate(model.graph.node) if k in keep or n.op_type in FP32_OP_TYPES]


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the converter's block list is a list of names)."""
    used: set[str] = set()
    all_names = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            name = f"{node.op_type}_{i}"
            while name in used or name in all_names:
                name += "_"
            node.name = name
        used.add(node.name)


def convert_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """An fp16 copy of ``model`` with explicit casts around the fp32 nodes; float32 inputs and outputs.

    Returns ``(fp16 model, names of the nodes kept in fp32)``."""
    from onnxconverter_common import float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    name_unnamed_nodes(model)
    block = [model.graph.node[k].name for k in fp32_node_indices(model)]
    del model.graph.value_info[:]  # stale float32 annotations would contradict the casts
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=block,
                                                 disable_shape_infer=False)
    onnx.checker.check_model(converted)
    return converted, block


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Number of float32 and float16 initializers (a quick summary of what a conversion did)."""
    counts = {"float32": 0, "float16": 0}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            counts["float32"] += 1
        elif init.data_type == onnx.TensorProto.FLOAT16:
            counts["float16"] += 1
    return counts
