"""A pool of Triton servers behind the one Backend interface: batches spread over the servers that are up.

``TritonPool(urls, clients_per_server=k)`` opens ``k`` ``TritonBackend`` clients (own connections)
per ready server. ``pipeline.sample_images`` hands whole batches to ``map_batches``: one worker thread
per client takes batch indices from a queue and runs them with its client bound to the thread, so
``unet`` / ``flow_reverse`` / ``sample_on_server`` inside that batch go to that client's server.
Concurrent clients of one server meet Triton's dynamic batcher there (``dynamic_batching`` in the
generated configs), which merges their requests into larger batches.

Failover: a client whose server stops answering (``TritonUnavailable``: refused, reset, timed out after
the client's retries) drops that server for every client of it, and the batch it was running goes
back to the queue for another server. Batch i is always seeded ``pipeline.batch_seed(seed, i)`` and a
retried batch starts from its seed again, so the result never depends on which server ran it. When no
server is left, ``TritonPoolExhausted`` is raised and no partial result is returned.

All servers must serve the same networks (the ONNX sha256 each config records); a pool over servers
with different models is refused at construction.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from typing import Any, Callable, Sequence

import torch

from ftddm_trt.diffusion import SampleResult
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec
from ftddm_trt.engine.triton_backend import TritonBackend, TritonUnavailable


class TritonPoolExhausted(TritonUnavailable):
    """Every server of the pool is gone (or none was ready)."""


class TritonPool(Backend):
    """Backend over several Triton servers (see the module docstring).

    urls: ``host:port`` endpoints; clients_per_server: concurrent requests per server (>= 1);
    client_kwargs: passed to every ``TritonBackend`` (protocol, timeout_s, retries, ...);
    log: receives one line per dropped server.
    """

    name = "triton"

    def __init__(
        self,
        urls: Sequence[str],
        clients_per_server: int = 1,
        log: Callable[[str], None] = lambda _m: None,
        **client_kwargs: Any,
    ) -> None:
        urls = list(dict.fromkeys(urls))  # unique, in order
        if not urls:
            raise ValueError("TritonPool needs at least one URL")
        if clients_per_server < 1:
            raise ValueError(f"clients_per_server must be >= 1, got {clients_per_server}")
        self.urls = urls
        self.device = torch.device("cpu")
        self.log = log
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: dict[str, list[TritonBackend]] = {}
        self._down: dict[str, str] = {}
        self._retired: list[TritonBackend] = []
        self._usage: Counter[str] = Counter()
        self._rr = 0
        for url in urls:
            try:
                self._clients[url] = [TritonBackend(url, **client_kwargs) for _ in range(clients_per_server)]
            except TritonUnavailable as err:
                self._down[url] = str(err)
                log(f"Triton server {url} is not ready, left out: {err}")
        if not self._clients:
            raise TritonPoolExhausted(f"none of the Triton servers is ready: {'; '.join(self._down.values())}")
        hashes = {url: _served_hashes(cs[0].describe()) for url, cs in self._clients.items()}
        first_url, first = next(iter(hashes.items()))
        for url, h in hashes.items():
            common = set(h) & set(first)
            if any(h[n] != first[n] for n in common):
                self.close()
                raise ValueError(f"Triton servers {first_url} and {url} serve different models ({first} vs {h}); "
                                 "a pool needs the same repository on every server")

    # -- servers -----------------------------------------------------------------------------------
    @property
    def live_urls(self) -> list[str]:
        """The servers still in the pool, in their given order."""
        with self._lock:
            return [u for u in self.urls if u in self._clients]

    def _drop(self, url: str, why: BaseException) -> None:
        with self._lock:
            clients = self._clients.pop(url, None)
            if clients is None:
                return
            self._down[url] = str(why)
            self._retired.extend(clients)  # closed by close(): another worker may still be inside a request
        self.log(f"Triton server {url} dropped from the pool: {why}")

    def _exhausted(self) -> TritonPoolExhausted:
        return TritonPoolExhausted("every Triton server of the pool is gone: "
                                   + "; ".join(f"{u}: {w}" for u, w in self._down.items()))

    def _pick(self) -> tuple[str, TritonBackend]:
        """The client bound to this worker thread, else the next live server's first client (round robin)."""
        bound = getattr(self._local, "client", None)
        if bound is not None:
            return bound
        with self._lock:
            live = [u for u in self.urls if u in self._clients]
            if not live:
                raise self._exhausted()
            url = live[self._rr % len(live)]
            self._rr += 1
            return url, self._clients[url][0]

    def _call(self, fn: Callable[[TritonBackend], Any]) -> Any:
        """One request. Inside a worker a failure propagates (map_batches retries the whole batch);
        outside, it is retried on the next live server (a network call is a pure function)."""
        while True:
            url, client = self._pick()
            try:
                return fn(client)
            except TritonUnavailable as err:
                self._drop(url, err)
                if getattr(self._local, "client", None) is not None:
                    raise

    # -- Backend -----------------------------------------------------------------------------------
    def expect_weights(self, hashes: dict[str, str]) -> None:
        """Pass the checked weights on to every client of every live server."""
        with self._lock:
            clients = [c for cs in self._clients.values() for c in cs]
        for c in clients:
            c.expect_weights(hashes)

    def unet(self, x_t, y, t, s, full: bool = False) -> torch.Tensor:
        """Predicted noise from a live server (retried on the next one when called outside a worker)."""
        return self._call(lambda c: c.unet(x_t, y, t, s, full=full))

    def flow_reverse(self, eps, y, tau_f) -> torch.Tensor:
        """x_Ttrunc from a live server (retried on the next one when called outside a worker)."""
        return self._call(lambda c: c.flow_reverse(eps, y, tau_f))

    def munet(self, y, s) -> torch.Tensor:
        """MUNet's x0 from a live server (retried on the next one when called outside a worker)."""
        return self._call(lambda c: c.munet(y, s))

    def enhancer_reverse(self, eps, y, x_munet, tau_f) -> torch.Tensor:
        """The flow enhancer's x0 from a live server (retried on the next one when called outside a worker)."""
        return self._call(lambda c: c.enhancer_reverse(eps, y, x_munet, tau_f))

    def sample_on_server(
        self, y: torch.Tensor, s: torch.Tensor, spec: SamplerSpec, seed_for_batch: int
    ) -> SampleResult:
        """One batch through a server's ftddm_sampler (see ``TritonBackend.sample_on_server``)."""
        return self._call(lambda c: c.sample_on_server(y, s, spec, seed_for_batch))

    def map_batches(self, run: Callable[[int], SampleResult], n_batches: int,
                    done: Callable[[int], None] | None = None) -> list[SampleResult]:
        """Run ``run(i)`` for i in 0..n_batches-1 over the live servers; results in batch order.

        ``done(i)`` is called (from the caller's thread) as batch i finishes. A batch whose server dies
        is rerun from scratch on another; ``TritonPoolExhausted`` when no server is left.
        """
        todo: queue.Queue[int] = queue.Queue()
        for i in range(n_batches):
            todo.put(i)
        finished: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        results: dict[int, SampleResult] = {}
        stop = threading.Event()
        with self._lock:
            workers = [(u, c) for u in self.urls if u in self._clients for c in self._clients[u]]
        if not workers:
            raise self._exhausted()

        def work(url: str, client: TritonBackend) -> None:
            self._local.client = (url, client)
            try:
                while not stop.is_set():
                    if url not in self._clients:
                        return
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        res = run(i)
                    except TritonUnavailable as err:
                        todo.put(i)  # back to the queue for a server that is still up
                        self._drop(url, err)
                        finished.put(("lost", i, url))
                        return
                    except BaseException as err:  # a real error (bad input, model failure): stop everything
                        finished.put(("error", i, err))
                        return
                    with self._lock:
                        self._usage[url] += 1
                    finished.put(("ok", i, res))
            finally:
                self._local.client = None
                finished.put(("exit", -1, url))

        threads = [threading.Thread(target=work, args=w, daemon=True, name=f"triton-pool-{w[0]}") for w in workers]
        for th in threads:
            th.start()
        alive = len(threads)
        error: BaseException | None = None
        try:
            while len(results) < n_batches and alive > 0:
                kind, i, payload = finished.get()
                if kind == "ok":
                    results[i] = payload
                    if done is not None:
                        done(i)
                elif kind == "error":
                    error = payload
                    stop.set()
                elif kind == "exit":
                    alive -= 1
                    # workers leave when the queue looks empty; a batch requeued after that needs a new one
                    if alive == 0 and len(results) < n_batches and error is None and self.live_urls:
                        workers = [(u, c) for u in self.live_urls for c in self._clients.get(u, [])]
                        threads = [threading.Thread(target=work, args=w, daemon=True) for w in workers]
                        for th in threads:
                            th.start()
                        alive = len(threads)
        finally:
            stop.set()
        if error is not None:
            raise error
        if len(results) < n_batches:
            raise self._exhausted()
        return [results[i] for i in range(n_batches)]

    # -- bookkeeping -------------------------------------------------------------------------------
    def take_usage(self) -> dict[str, int]:
        """Batches each server finished since the last call (then reset)."""
        with self._lock:
            usage, self._usage = dict(self._usage), Counter()
        return usage

    def describe(self) -> dict[str, Any]:
        """The pool's servers (given, live, dropped with why) and the first live server's facts."""
        live = self.live_urls
        first = self._clients[live[0]][0].describe() if live else {}
        return {"backend": self.name, "device": "cpu", "pool": True, "urls": self.urls, "live": live,
                "dropped": dict(self._down), "server_version": first.get("server_version"),
                "protocol": first.get("protocol"), "onnx": first.get("onnx", {}), "models": first.get("models", {})}

    def close(self) -> None:
        """Close every client, those of dropped servers included."""
        with self._lock:
            clients = [c for cs in self._clients.values() for c in cs] + self._retired
            self._clients.clear()
            self._retired = []
        for c in clients:
            c.close()


def _served_hashes(info: dict[str, Any]) -> dict[str, str]:
    """ONNX and weights sha256 of each network a server reports (``describe()``), keyed apart."""
    return {**info.get("onnx", {}), **{f"{n} weights": h for n, h in info.get("models", {}).items()}}
