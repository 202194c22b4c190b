"""Triton Python-backend model ``ftddm_sampler``: the whole sampling loop inside the server.

Copied as ``ftddm_sampler/1/model.py`` by ``ftddm_trt.serving.repository`` (source:
``ftddm_trt/serving/triton_templates/python/sampler.py``). One request = one batch: inputs ``y`` (B,4,64,64)
and ``s`` (B,1), the request parameter ``settings`` (JSON: ``SamplerSpec.to_dict()`` plus the batch's seed); outputs
``x0`` (B,1,64,64) and ``nfe`` (B,1). The loop is ``ftddm_trt.engine.pipeline.sample_batch`` over a Backend
whose networks are BLS requests to the network models (``ftddm_trt.serving.bls``), so the server-side
loop and the client-side loop are the same code. Needs torch and ftddm_trt in the server's Python
(the launcher puts the virtual environment's bin/ first on PATH).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Triton's Python-backend model ``ftddm_sampler``: the sampling loop over BLS requests."""

    def initialize(self, args):
        """Read the config's parameters and make the BLS backend the loop runs on."""
        import torch

        from ftddm_trt.engine.triton_backend import decode_ttrunc_param
        from ftddm_trt.serving.bls import BLSBackend

        config = json.loads(args["model_config"])
        # a parameter whose value is empty has no "string_value" in the config's JSON
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(max(1, int(params.get("torch_threads", "1") or 1)))
        self.timeout_us = int(params.get("bls_timeout_us", "0") or 0)
        ttrunc = decode_ttrunc_param(params, "ftddm_sampler's config")
        # a repository that records none refuses checked requests
        weights = json.loads(params.get("weights_sha256") or "{}")
        self.backend = BLSBackend(self._infer, json.loads(params["models"]), flow_ttrunc=ttrunc, weights=weights)

    def _infer(self, model, inputs, outputs):
        kwargs = {"timeout": self.timeout_us} if self.timeout_us > 0 else {}
        request = pb_utils.InferenceRequest(
            model_name=model,
            requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(arr)) for name, arr in inputs.items()],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
            **kwargs,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"BLS request to {model} failed: {response.error().message()}")
        result = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor.is_cpu():
                result[name] = tensor.as_numpy()
            else:  # a GPU model ignored the preferred memory
                from torch.utils.dlpack import from_dlpack

                result[name] = from_dlpack(tensor.to_dlpack()).cpu().numpy()
        return result

    def execute(self, requests):
        """One response per request: its batch sampled with the request's settings and seed, or its error."""
        from ftddm_trt.serving.bls import run_sampler

        responses = []
        for request in requests:
            try:
                y = pb_utils.get_input_tensor_by_name(request, "y").as_numpy()
                s = pb_utils.get_input_tensor_by_name(request, "s").as_numpy()
                params = json.loads(request.parameters() or "{}")
                if "settings" not in params:
                    raise ValueError('the request has no "settings" parameter (JSON: SamplerSpec.to_dict() plus seed)')
                x0, nfe = run_sampler(self.backend, y, s, params["settings"])
                nfe_t = np.full((x0.shape[0], 1), nfe, dtype=np.int32)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor("x0", x0), pb_utils.Tensor("nfe", nfe_t)]
                    )
                )
            except Exception as err:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"ftddm_sampler: {type(err).__name__}: {err}")
                    )
                )
        return responses

    def finalize(self):
        """Drop the backend."""
        self.backend = None
