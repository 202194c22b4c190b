"""Triton backend: the networks run in a Triton Inference Server, reached with ``tritonclient``.

Two ways to sample through Triton:

- the *client loop*: ``sample_images(TritonBackend(...), ...)`` runs the sampler here and sends one
  request per network evaluation to ``ftddm_unet`` / ``ftddm_unet_full`` / ``ftddm_flow``;
- the *server loop*: ``TritonBackend.sample_images_on_server`` sends one request per batch to
  ``ftddm_sampler``, which runs the same ``pipeline.sample_batch`` inside the server over BLS requests
  (``ftddm_trt.serving.bls``). Batch i is seeded ``pipeline.batch_seed(seed, i)`` as in ``sample_images``, so
  both loops give the same result for the same seed and batch size.

Tensor names are the ONNX graphs' (``x_t, y, t, s -> eps``; ``eps, y, tau_f -> x``). The per-item
scalars t, s, tau_f travel as ``(B, 1)`` (Triton dims ``[1]``, reshaped to ``(B,)`` for the graph).

Transient failures (gRPC UNAVAILABLE, connection refused or reset; "unknown model" / "not ready" for a
model this client already saw ready, i.e. a server restarting) are retried ``retries`` times with
exponential backoff, or for ``retry_s`` seconds when given (backoff capped at 2 s), so a client rides
out a server restart; then ``TritonUnavailable`` names the URL. The server and the needed models are
checked at construction. With ``shared_memory=True`` inputs and outputs travel through POSIX shared
memory regions registered with the server (same host only), released by ``close()``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ftddm_trt.diffusion import SampleResult
from ftddm_trt.engine.backend import NETWORKS, Backend, MissingNetwork
from ftddm_trt.engine.model_check import WEIGHTS_PARAM
from ftddm_trt.engine.pipeline import SamplerSpec, batch_seed, sample_images  # noqa: F401  (batch_seed re-exported)
from ftddm_trt.export.manifest import FLOW_TTRUNC_KEY, TtruncMismatch

#: Triton model name of each network (the repository generator and the client share them).
TRITON_MODELS: dict[str, str] = {"unet": "ftddm_unet", "unet_full": "ftddm_unet_full", "flow": "ftddm_flow",
                                 "munet": "ftddm_munet", "flow_enhancer": "ftddm_flow_enhancer"}
SAMPLER_MODEL = "ftddm_sampler"
#: Input/output names of each network model, as in the ONNX graphs.
NETWORK_TENSORS: dict[str, tuple[tuple[str, ...], str]] = {
    "unet": (("x_t", "y", "t", "s"), "eps"),
    "unet_full": (("x_t", "y", "t", "s"), "eps"),
    "flow": (("eps", "y", "tau_f"), "x"),
    "munet": (("y", "s"), "x0"),
    "flow_enhancer": (("eps", "y", "x_munet", "tau_f"), "x"),
}
PROTOCOLS = ("grpc", "http")
#: config.pbtxt parameter of ftddm_flow and ftddm_sampler: the Ttrunc the flow was trained for ("none": unrecorded).
FLOW_TTRUNC_PARAM = FLOW_TTRUNC_KEY


def encode_ttrunc_param(ttrunc: int | None) -> str:
    """The string value of the ``flow_ttrunc`` config parameter."""
    return "none" if ttrunc is None else str(int(ttrunc))


def decode_ttrunc_param(params: dict[str, str], where: str) -> int | None:
    """Inverse of ``encode_ttrunc_param`` on a model's string parameters; a repository generated before
    Ttrunc was recorded (no such parameter) is refused with TtruncMismatch."""
    if FLOW_TTRUNC_PARAM not in params:
        raise TtruncMismatch(f"{where} does not record the Ttrunc its flow was trained for (a repository from an "
                             "older ftddm-trt): regenerate it with `ftddm-trt triton-repo`")
    value = params[FLOW_TTRUNC_PARAM].strip().lower()
    return None if value in ("", "none", "null") else int(value)


class TritonUnavailable(RuntimeError):
    """The Triton server cannot be reached, or a model it should serve is not ready."""


class TritonInferenceError(RuntimeError):
    """The server answered with an error that retrying will not fix (bad input, model failure)."""


def encode_sampler_settings(spec: SamplerSpec, seed: int, weights: dict[str, str] | None = None) -> str:
    """The ``settings`` request parameter of ftddm_sampler: ``SamplerSpec.to_dict()`` plus the batch's seed, as
    JSON (floats round-trip exactly). Every sampler setting travels, so the server runs what the client asked.
    ``weights`` (network -> sha256 of the client's model folder) travels as ``weights_sha256``: the server
    loop refuses a request made for other weights than its networks'."""
    extra = {WEIGHTS_PARAM: dict(weights)} if weights else {}
    return json.dumps({**spec.to_dict(), "seed": int(seed), **extra}, sort_keys=True)


def decode_sampler_settings(text: str) -> tuple[SamplerSpec, int]:
    """Inverse of ``encode_sampler_settings`` without the weights (see ``decode_sampler_request``)."""
    spec, seed, _weights = decode_sampler_request(text)
    return spec, seed


def decode_sampler_request(text: str) -> tuple[SamplerSpec, int, dict[str, str] | None]:
    """Inverse of ``encode_sampler_settings`` (through ``SamplerSpec.from_dict``): spec, seed and the weights
    the client checked (None when it sent none); a ValueError names what is wrong."""
    try:
        d = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"sampler settings are not JSON: {err}") from err
    if not isinstance(d, dict):
        raise ValueError(f"sampler settings must be a JSON object, got {type(d).__name__}")
    seed = d.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    weights = d.pop(WEIGHTS_PARAM, None)
    if weights is not None and (not isinstance(weights, dict) or not all(isinstance(v, str) for v in weights.values())):
        raise ValueError(f"{WEIGHTS_PARAM} must map network names to sha256 strings, got {weights!r}")
    return SamplerSpec.from_dict(d), seed, weights


def _is_transient(err: BaseException) -> bool:
    """Errors worth a retry: the server is (re)starting, unreachable, or dropped the connection."""
    if isinstance(err, (ConnectionError, TimeoutError)):  # refused, reset, aborted (http client)
        return True
    if type(err).__name__ == "HTTPConnectionClosed":  # geventhttpclient: the server closed the socket
        return True
    status = getattr(err, "status", None)
    code = status() if callable(status) else None
    if code == "StatusCode.UNAVAILABLE":
        return True
    msg = str(err).lower()
    return any(k in msg for k in ("connection refused", "connection reset", "broken pipe", "failed to connect",
                                  "socket closed", "connection aborted", "connection closed"))


class _ShmRegion:
    """One POSIX shared-memory region registered with the server, grown on demand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = f"/{name}"
        self.size = 0
        self.handle = None

    def ensure(self, client, size: int) -> None:
        import tritonclient.utils.shared_memory as shm

        if size <= self.size:
            return
        self.release(client)
        size = max(size, 2 * self.size)
        self.handle = shm.create_shared_memory_region(self.name, self.key, size, create_only=True)
        self.size = size
        client.register_system_shared_memory(self.name, self.key, size)

    def reregister(self, client) -> None:
        if self.handle is None:
            return
        try:
            client.unregister_system_shared_memory(self.name)
            client.register_system_shared_memory(self.name, self.key, self.size)
        except Exception:  # still unreachable: the next attempt tries again
            pass

    def release(self, client) -> None:
        import tritonclient.utils.shared_memory as shm

        if self.handle is None:
            return
        if client is not None:
            try:
                client.unregister_system_shared_memory(self.name)
            except Exception:  # the server may be gone; the local region is still ours to remove
                pass
        try:
            shm.destroy_shared_memory_region(self.handle)
        except Exception:
            pass
        self.handle = None
        self.size = 0


def _destroy_regions(regions: list[_ShmRegion]) -> None:
    for r in regions:
        r.release(None)


class TritonBackend(Backend):
    """Backend over a Triton server (see the module docstring).

    url: ``host:port`` of the gRPC (default) or HTTP endpoint. timeout_s: per network request
    (a server-loop batch gets ``timeout_s`` per NFE). retries/backoff_s: on transient errors, retry
    after backoff_s, 2*backoff_s, ... require: networks whose models must be ready at construction
    (the others are checked on first use). models: override the Triton model names.
    """

    name = "triton"

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: str = "grpc",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        shared_memory: bool = False,
        require: Sequence[str] = ("unet", "flow"),
        models: dict[str, str] | None = None,
        sampler_model: str = SAMPLER_MODEL,
        retry_s: float | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if retries < 0 or timeout_s <= 0:
            raise ValueError("retries must be >= 0 and timeout_s > 0")
        self.url = url
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        if retry_s is not None and retry_s < 0:
            raise ValueError("retry_s must be >= 0")
        self.retry_s = None if retry_s is None else float(retry_s)
        self.models = dict(TRITON_MODELS if models is None else models)
        self.sampler_model = sampler_model
        self.expected_weights: dict[str, str] | None = None
        self.device = torch.device("cpu")
        self._lock = threading.Lock()
        self._ready: set[str] = set()
        self._closed = False
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        self.shared_memory = bool(shared_memory)
        self._regions: list[_ShmRegion] = []
        self.client = self._new_client()
        try:
            self.server_version = self._check_server()
            for net in require:
                self._require_model(self.models[net])
        except BaseException:
            self.client.close()
            raise
        if self.shared_memory:
            tag = f"ftddm_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            self._regions = [_ShmRegion(f"{tag}_in"), _ShmRegion(f"{tag}_out")]
            self._finalizer = weakref.finalize(self, _destroy_regions, self._regions)

    # -- connection --------------------------------------------------------------------------------
    def _new_client(self):
        if self.protocol == "grpc":
            return self._tc.InferenceServerClient(self.url)
        return self._tc.InferenceServerClient(
            self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )

    def _transient(self, err: BaseException) -> bool:
        """``_is_transient``, or a model this client saw ready now unknown / not ready (a restart)."""
        if _is_transient(err):
            return True
        msg = str(err).lower()
        return bool(self._ready) and any(k in msg for k in ("unknown model", "not ready", "is not found"))

    def _retrying(self, what: str, fn: Callable[[], Any], attempts: int | None = None) -> Any:
        """Call ``fn``; on transient errors retry ``attempts`` (default retries + 1) times in all, and
        for at least ``retry_s`` seconds when set."""
        attempts = self.retries + 1 if attempts is None else attempts
        t0 = time.monotonic()
        last: BaseException | None = None
        k = 0
        while True:
            try:
                return fn()
            except Exception as err:
                if not self._transient(err):
                    raise
                last = err
                k += 1
                wait = self.backoff_s * (2 ** (k - 1))
                if self.retry_s is not None:
                    wait = min(wait, 2.0)
                more = k < attempts or (self.retry_s is not None and time.monotonic() + wait - t0 <= self.retry_s)
                if more:
                    time.sleep(wait)
                    if self.protocol == "http":  # a dropped keep-alive connection: start afresh
                        try:
                            self.client.close()
                        except Exception:
                            pass
                        self.client = self._new_client()
                    for r in self._regions:  # a restarted server forgot the registrations
                        try:
                            r.reregister(self.client)
                        except Exception:  # still down: the next attempt tells
                            pass
                    continue
                break
        raise TritonUnavailable(f"Triton server at {self.url} ({self.protocol}) is unreachable: {what} failed "
                                f"{k} time(s) over {time.monotonic() - t0:.1f} s; last error: {last}") from last

    def _check_server(self) -> str:
        def probe():
            if not self.client.is_server_live():
                raise ConnectionError("server not live")
            if not self.client.is_server_ready():
                raise ConnectionError("server not ready")
            meta = self.client.get_server_metadata()
            return meta.version if hasattr(meta, "version") else meta.get("version", "?")

        return self._retrying("the readiness check", probe)

    def _require_model(self, model: str) -> None:
        if model in self._ready:
            return
        try:
            ready = self._retrying(f"the readiness check of {model}", lambda: self.client.is_model_ready(model))
        except TritonUnavailable:
            raise
        except Exception as err:
            raise TritonUnavailable(f"Triton server at {self.url}: cannot check model {model}: {err}") from err
        if not ready:
            raise TritonUnavailable(
                f"Triton server at {self.url} does not serve model {model!r} (not loaded or not "
                "ready); build the repository with `ftddm-trt triton-repo` and check the server log"
            )
        self._ready.add(model)

    # -- requests ----------------------------------------------------------------------------------
    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: dict[str, tuple[int, ...]], timeout_s: float,
               parameters: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """One request; ``outputs`` maps each output name to its expected shape (sizes the shm region)."""
        if self._closed:
            raise RuntimeError("TritonBackend is closed")
        self._require_model(model)
        arrays = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        with self._lock:
            return self._retrying(
                f"request to {model}", lambda: self._infer_once(model, arrays, outputs, timeout_s, parameters)
            )

    def _infer_once(self, model, arrays, outputs, timeout_s, parameters):
        tc = self._tc
        ins = [
            tc.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT32")
            for name, arr in arrays.items()
        ]
        if self.shared_memory:
            return self._infer_shm(model, arrays, ins, outputs, timeout_s, parameters)
        for inp, arr in zip(ins, arrays.values()):
            inp.set_data_from_numpy(arr)
        outs = [tc.InferRequestedOutput(n) for n in outputs]
        result = self._send(model, ins, outs, timeout_s, parameters)
        return {n: result.as_numpy(n) for n in outputs}

    def _send(self, model, ins, outs, timeout_s, parameters):
        try:
            if self.protocol == "grpc":
                return self.client.infer(model, ins, outputs=outs, client_timeout=timeout_s, parameters=parameters)
            return self.client.infer(model, ins, outputs=outs, parameters=parameters)
        except Exception as err:
            if self._transient(err):
                raise
            status = getattr(err, "status", None)
            if callable(status) and status() == "StatusCode.DEADLINE_EXCEEDED":
                raise TritonUnavailable(
                    f"Triton server at {self.url}: request to {model} timed out after {timeout_s:g} s"
                ) from err
            raise TritonInferenceError(f"Triton server at {self.url}: request to {model} failed: {err}") from err

    def _infer_shm(self, model, arrays, ins, outputs, timeout_s, parameters):
        import tritonclient.utils.shared_memory as shm

        tc = self._tc
        region_in, region_out = self._regions
        sizes = [a.nbytes for a in arrays.values()]
        region_in.ensure(self.client, sum(sizes))
        offset = 0
        for inp, arr, size in zip(ins, arrays.values(), sizes):
            shm.set_shared_memory_region(region_in.handle, [arr], offset=offset)
            inp.set_shared_memory(region_in.name, size, offset=offset)
            offset += size
        out_sizes = {n: int(np.prod(shape)) * 4 for n, shape in outputs.items()}  # FP32 / INT32
        region_out.ensure(self.client, sum(out_sizes.values()))
        outs, offsets, offset = [], {}, 0
        for n in outputs:
            o = tc.InferRequestedOutput(n)
            o.set_shared_memory(region_out.name, out_sizes[n], offset=offset)
            outs.append(o)
            offsets[n] = offset
            offset += out_sizes[n]
        result = self._send(model, ins, outs, timeout_s, parameters)
        got = {}
        for n in outputs:
            out = result.get_output(n)
            shape = list(out.shape) if hasattr(out, "shape") else list(out["shape"])
            dtype = out.datatype if hasattr(out, "datatype") else out["datatype"]
            got[n] = np.array(
                shm.get_contents_as_numpy(region_out.handle, tc_dtype(dtype), shape, offset=offsets[n]), copy=True
            )
        return got

    # -- Backend -----------------------------------------------------------------------------------
    def _network(self, network: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        names, output = NETWORK_TENSORS[network]
        if network not in self.models:
            raise MissingNetwork(f"{self.origin()}: no Triton model is named for network {network!r}")
        model = self.models[network]
        arrays = {}
        for n in names:
            arr = np.ascontiguousarray(feeds[n].detach().cpu().numpy(), dtype=np.float32)
            arrays[n] = arr.reshape(-1, 1) if arr.ndim == 1 else arr
        img = arrays[names[0]].shape
        out = self._infer(model, arrays, {output: (img[0], 1, *img[2:])}, self.timeout_s)[output]
        return torch.from_numpy(np.array(out, dtype=np.float32))  # a writable copy

    def unet(self, x_t, y, t, s, full: bool = False) -> torch.Tensor:
        """Predicted noise ``(B,1,64,64)`` from the served UNet model (one request)."""
        return self._network("unet_full" if full else "unet", {"x_t": x_t, "y": y, "t": t, "s": s})

    def flow_reverse(self, eps, y, tau_f) -> torch.Tensor:
        """x_Ttrunc ``(B,1,64,64)`` from the served flow model (one request)."""
        return self._network("flow", {"eps": eps, "y": y, "tau_f": tau_f})

    def munet(self, y, s) -> torch.Tensor:
        """x0 ``(B,1,64,64)`` from the served MUNet model (one request)."""
        return self._network("munet", {"y": y, "s": s})

    def enhancer_reverse(self, eps, y, x_munet, tau_f) -> torch.Tensor:
        """The enhanced x0 ``(B,1,64,64)`` from the served flow enhancer model (one request)."""
        return self._network("flow_enhancer", {"eps": eps, "y": y, "x_munet": x_munet, "tau_f": tau_f})

    def sample_on_server(
        self, y: torch.Tensor, s: torch.Tensor, spec: SamplerSpec, seed_for_batch: int
    ) -> SampleResult:
        """One batch through ftddm_sampler (the whole loop in the server): the same result as
        ``pipeline.sample_batch(backend, spec, y, s, torch.Generator().manual_seed(seed_for_batch))``."""
        arrays = {"y": np.ascontiguousarray(y.detach().cpu().numpy(), dtype=np.float32),
                  "s": np.ascontiguousarray(s.detach().cpu().numpy(), dtype=np.float32).reshape(-1, 1)}
        params = {"settings": encode_sampler_settings(spec, seed_for_batch, self.expected_weights)}
        b, _, h, w = arrays["y"].shape
        out = self._infer(
            self.sampler_model, arrays, {"x0": (b, 1, h, w), "nfe": (b, 1)}, self.timeout_s * max(1, spec.nfe), params
        )
        return SampleResult(
            x0=torch.from_numpy(np.array(out["x0"], dtype=np.float32)), nfe=int(np.asarray(out["nfe"]).reshape(-1)[0])
        )

    def sample_images_on_server(
        self,
        spec: SamplerSpec,
        y: torch.Tensor,
        s: torch.Tensor,
        batch_size: int = 8,
        seed: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """``pipeline.sample_images`` with each batch sampled by ftddm_sampler (one request per batch)."""
        return sample_images(self, spec, y, s, batch_size=batch_size, seed=seed, progress=progress,
                             batch_sampler=lambda yb, sb, bseed: self.sample_on_server(yb, sb, spec, bseed))

    def expect_weights(self, hashes: dict[str, str]) -> None:
        """The weights (network -> sha256) the caller checked the served networks against; server-loop
        requests carry them, and ftddm_sampler refuses a request whose weights are not its networks'."""
        self.expected_weights = dict(hashes)

    @property
    def flow_ttrunc(self) -> int | None:
        """The Ttrunc of the served flow (parameter ``flow_ttrunc`` of ftddm_flow's config), read once."""
        if not hasattr(self, "_flow_ttrunc"):
            model = self.models["flow"]
            self._flow_ttrunc = decode_ttrunc_param(self.model_parameters(model), f"model {model} of {self.origin()}")
        return self._flow_ttrunc

    def origin(self) -> str:
        """The server's URL, for messages."""
        return f"the Triton server at {self.url}"

    def model_parameters(self, model: str) -> dict[str, str]:
        """The string parameters of a served model's config (the generator records onnx_sha256 there)."""
        cfg = self._retrying(f"config of {model}", lambda: self.client.get_model_config(model))
        if self.protocol == "grpc":
            return {k: v.string_value for k, v in cfg.config.parameters.items()}
        return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}

    def describe(self) -> dict[str, Any]:
        """The base facts plus URL, protocol, server version, shared memory, and the ONNX and weights' hashes
        each ready network model records in its config."""
        info: dict[str, Any] = {**super().describe(), "url": self.url, "protocol": self.protocol,
                                "server_version": self.server_version, "shared_memory": self.shared_memory}
        hashes, weights = {}, {}
        for net in NETWORKS:
            model = self.models.get(net)
            try:
                if model and self.client.is_model_ready(model):
                    params = self.model_parameters(model)
                    hashes[net] = params.get("onnx_sha256", "")
                    weights[net] = params.get(WEIGHTS_PARAM, "")
            except Exception:
                continue
        info["onnx"] = hashes
        info["models"] = weights
        return info

    def close(self) -> None:
        """Release the shared-memory regions and close the client (once)."""
        if self._closed:
            return
        self._closed = True
        for r in self._regions:
            r.release(self.client)
        try:
            self.client.close()
        except Exception:
            pass


def tc_dtype(datatype: str):
    """numpy dtype of a Triton datatype string."""
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(datatype)
