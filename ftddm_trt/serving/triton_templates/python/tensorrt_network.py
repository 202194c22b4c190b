"""Triton Python-backend model: one FTDDM network (UNet or flow) run as a TensorRT engine on the GPU.

Copied as ``<model>/1/model.py`` into a ``gpu-python`` repository by ``ftddm_trt.serving.repository``
(source: ``ftddm_trt/serving/triton_templates/python/tensorrt_network.py``), beside the engine ``model.plan`` built by
``ftddm-trt build-engine``. This flavour is for servers that have only the Python backend (the
tritonserver bundled with nvidia-pytriton has no ``tensorrt_plan`` backend). It needs torch with CUDA,
tensorrt (10 or 11) and ftddm_trt in the server's Python.

Requests merged by Triton's dynamic batcher are concatenated, run as one engine call
(``ftddm_trt.export.tensorrt_build.EngineRunner``: checked input shapes, its own CUDA stream) and split
back. Config parameters: ``engine_file`` (default ``model.plan``), ``network`` and ``engine_sha256``
(the engine folder manifest's hash: the engine is hashed at load and the model refuses to load, naming
an IntegrityError, when they differ or no hash is given).
"""

import hashlib
import json
import os

import triton_python_backend_utils as pb_utils


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TritonPythonModel:
    """Triton's Python-backend model: one network run by a TensorRT engine (see the module docstring)."""

    def initialize(self, args):
        """Load the engine named by the config after checking its sha256, on the instance's GPU."""
        config = json.loads(args["model_config"])
        # a parameter whose value is empty has no "string_value" in the config's JSON
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = config["name"]
        here = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(here, params.get("engine_file", "model.plan"))
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.model_name}: engine {path} is missing")
        expected = params.get("engine_sha256", "")
        actual = _sha256(path)
        if actual != expected:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: IntegrityError: {path} has sha256 {actual[:16]}... but the engine manifest "
                f"records {expected[:16] or '(none)'}...; the engine is corrupt or was replaced: regenerate the "
                "repository"
            )
        self.engine_sha256 = actual  # verified before TensorRT or CUDA is touched
        import tensorrt as trt
        import torch

        from ftddm_trt.export.tensorrt_build import EngineRunner, tensorrt_major

        tensorrt_major(trt.__version__)
        device = int(args.get("model_instance_device_id", "0") or 0)
        torch.cuda.set_device(device)
        self.device = torch.device("cuda", device)
        self.runner = EngineRunner(trt.Runtime(trt.Logger(trt.Logger.WARNING)), path)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        if len(self.outputs) != 1:
            raise pb_utils.TritonModelException(f"{self.model_name}: expected one output, got {self.outputs}")
        # t, s, tau_f are (B,) in the engine; the config's dims [1] with reshape [] deliver (B, 1)
        self.ranks = {i["name"]: 1 if list(i.get("reshape", {}).get("shape", [None])) == [] else 1 + len(i["dims"])
                      for i in config["input"]}

    def execute(self, requests):
        """One response per request: the well-formed requests run as one merged batch, a malformed one fails alone."""
        import torch

        from ftddm_trt.serving.batching import as_graph_rank, merge, split

        responses = [None] * len(requests)
        feeds, ok = [], []
        for i, request in enumerate(requests):
            try:
                feeds.append({n: as_graph_rank(pb_utils.get_input_tensor_by_name(request, n).as_numpy(), self.ranks[n])
                              for n in self.inputs})
                ok.append(i)
            except Exception as err:  # a malformed request fails alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.model_name}: {err}"))
        if ok:
            try:
                merged, offsets = merge(feeds)
                with torch.inference_mode():
                    out = self.runner(
                        {n: torch.from_numpy(a).to(self.device) for n, a in merged.items()}, self.outputs[0]
                    )
                    result = out.cpu().numpy()
                for k, part in zip(ok, split({self.outputs[0]: result}, offsets)):
                    responses[k] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(n, a) for n, a in part.items()])
            except Exception as err:
                for k in ok:
                    responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.model_name}: {err}"))
        return responses

    def finalize(self):
        """Drop the engine."""
        self.runner = None
