"""Triton Python-backend model: one FTDDM network (UNet or flow) run with ONNX Runtime on the CPU.

Copied as ``<model>/1/model.py`` into a ``cpu`` repository by ``ftddm_trt.serving.repository`` (source:
``ftddm_trt/serving/triton_templates/python/onnx_network.py``). It needs only numpy and onnxruntime in the
server's Python.

Requests merged by Triton's dynamic batcher are concatenated along the batch axis, run as one ONNX
Runtime call, and split back. Tensor names come from the model's config.pbtxt, which the generator
wrote from the export manifest, so they are the ONNX graph's names. Config parameters:
``onnx_file`` (default ``model.onnx``, beside this file), ``intra_op_threads`` (0: ONNX Runtime's
default) and ``onnx_sha256`` (the export manifest's hash: the file is hashed at load and the model
refuses to load, naming an IntegrityError, when they differ or no hash is given).
"""

import hashlib
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TritonPythonModel:
    """Triton's Python-backend model: one network run with ONNX Runtime (see the module docstring)."""

    def initialize(self, args):
        """Load the ONNX file named by the config after checking its sha256; refuse tensors that differ from
        the graph's."""
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        # a parameter whose value is empty has no "string_value" in the config's JSON
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = config["name"]
        here = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(here, params.get("onnx_file", "model.onnx"))
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.model_name}: ONNX file {path} is missing")
        expected = params.get("onnx_sha256", "")
        actual = _sha256(path)
        if actual != expected:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: IntegrityError: {path} has sha256 {actual[:16]}... but the export manifest "
                f"records {expected[:16] or '(none)'}...; the file is corrupt or was replaced: regenerate the "
                "repository"
            )
        self.onnx_sha256 = actual
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = int(params.get("intra_op_threads", "0") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        if set(self.inputs) != graph_inputs or set(self.outputs) != graph_outputs:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config tensors {self.inputs} -> {self.outputs} differ from the ONNX graph's "
                f"{sorted(graph_inputs)} -> {sorted(graph_outputs)}")
        # rank the graph expects for each input (t, s, tau_f are (B,); config dims [1] with reshape [])
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}

    def _feeds(self, request):
        feeds = {}
        for name in self.inputs:
            arr = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if arr.ndim != self.ranks[name]:
                arr = arr.reshape(arr.shape[0], *([] if self.ranks[name] == 1 else arr.shape[1:]))
            feeds[name] = np.ascontiguousarray(arr, dtype=np.float32)
        return feeds

    def execute(self, requests):
        """One response per request: the well-formed requests run as one merged batch, a malformed one fails alone."""
        responses = [None] * len(requests)
        feeds, sizes, ok = [], [], []
        for i, request in enumerate(requests):
            try:
                f = self._feeds(request)
            except Exception as err:  # a malformed request fails alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.model_name}: {err}"))
                continue
            feeds.append(f)
            sizes.append(next(iter(f.values())).shape[0])
            ok.append(i)
        if ok:
            try:
                merged = {
                    n: np.concatenate([f[n] for f in feeds]) if len(feeds) > 1 else feeds[0][n] for n in self.inputs
                }
                outs = self.session.run(self.outputs, merged)
                offsets = np.cumsum([0, *sizes])
                for k, i in enumerate(ok):
                    lo, hi = offsets[k], offsets[k + 1]
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor(n, np.ascontiguousarray(o[lo:hi])) for n, o in zip(self.outputs, outs)
                        ]
                    )
            except Exception as err:
                for i in ok:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.model_name}: {err}"))
        return responses

    def finalize(self):
        """Drop the ONNX Runtime session."""
        self.session = None
