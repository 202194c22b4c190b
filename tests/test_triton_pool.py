"""TritonPool's scheduling and failover, with in-process fake clients in place of Triton servers.

The fake network is a pure function, so a pool must give exactly what the sequential pipeline gives on
one backend, whichever server ran which batch and whichever batch was rerun. The real servers are in
tests/test_cohort_e2e.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ftddm_trt.engine import triton_pool
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
from ftddm_trt.engine.triton_backend import TritonUnavailable
from ftddm_trt.engine.triton_pool import TritonPool, TritonPoolExhausted


class PureNet(Backend):
    """A deterministic stand-in for the networks (elementwise, so batching cannot change it)."""

    name = "pure"

    def unet(self, x_t, y, t, s, full=False):
        return 0.3 * x_t + 0.05 * y[:, :1] * (t / 50.0).view(-1, 1, 1, 1) + 0.01 * s.view(-1, 1, 1, 1)

    def flow_reverse(self, eps, y, tau_f):
        return 0.5 * eps * tau_f.view(-1, 1, 1, 1) + y[:, :1]


class World:
    """Which fake servers are down, and after how many calls a server dies."""

    def __init__(self):
        self.down: set[str] = set()
        self.die_after: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.hashes: dict[str, str] = {}
        self.lock = threading.Lock()


class FakeClient:
    net = PureNet()

    def __init__(self, url, world: World, **_kw):
        if url in world.down:
            raise TritonUnavailable(f"{url} refused")
        self.url, self.world = url, world

    def _tick(self):
        time.sleep(0.002)  # a request waits on the network: other workers run meanwhile
        w = self.world
        with w.lock:
            w.calls[self.url] = w.calls.get(self.url, 0) + 1
            if self.url in w.die_after and w.calls[self.url] > w.die_after[self.url]:
                w.down.add(self.url)
            if self.url in w.down:
                raise TritonUnavailable(f"Triton server at {self.url} is unreachable")

    def unet(self, *a, **k):
        self._tick()
        return self.net.unet(*a, **k)

    def flow_reverse(self, *a):
        self._tick()
        return self.net.flow_reverse(*a)

    def describe(self):
        return {"onnx": {"unet": self.world.hashes.get(self.url, "u1"), "flow": "f1"}, "server_version": "fake"}

    def close(self):
        pass


@pytest.fixture
def world(monkeypatch):
    w = World()
    monkeypatch.setattr(triton_pool, "TritonBackend", lambda url, **kw: FakeClient(url, w, **kw))
    return w


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(23, 4, 64, 64, generator=g)
    y[:, 1] = (y[:, 1] > 0.2).float()
    return y, torch.full((23,), 4.0)


SPEC = SamplerSpec("ftddm", ttrunc=6)  # flow + 6 ancestral steps: 7 calls per batch, fresh noise each step
URLS = ["a:1", "b:1", "c:1"]


def test_pool_equals_sequential_and_spreads(world, inputs):
    y, s = inputs
    ref, nfe = sample_images(PureNet(), SPEC, y, s, batch_size=4, seed=3)
    with TritonPool(URLS, clients_per_server=2) as pool:
        seen = []
        out, n = sample_images(pool, SPEC, y, s, batch_size=4, seed=3, progress=seen.append)
        usage = pool.take_usage()
    assert n == nfe == 7
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert sum(usage.values()) == 6 and len(usage) >= 2, usage  # 6 batches over several servers
    assert seen[-1] == 23 and seen == sorted(seen)


def test_dead_server_is_dropped_and_its_batch_rerun(world, inputs):
    y, s = inputs
    ref, _ = sample_images(PureNet(), SPEC, y, s, batch_size=4, seed=3)
    world.down.add("c:1")  # not ready at start: left out
    world.die_after["a:1"] = 10  # dies in the middle of its second batch
    logs = []
    with TritonPool(URLS, log=logs.append) as pool:
        assert pool.live_urls == ["a:1", "b:1"]
        out, _ = sample_images(pool, SPEC, y, s, batch_size=4, seed=3)
        assert pool.live_urls == ["b:1"]
        info = pool.describe()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert set(info["dropped"]) == {"a:1", "c:1"}
    assert any("a:1 dropped" in m for m in logs)


def test_every_server_gone(world, inputs):
    y, s = inputs
    world.die_after.update({"a:1": 3, "b:1": 5})
    with TritonPool(URLS[:2]) as pool:
        with pytest.raises(TritonPoolExhausted, match="every Triton server"):
            sample_images(pool, SPEC, y, s, batch_size=4, seed=3)
    world.down.update(URLS)
    with pytest.raises(TritonPoolExhausted, match="none of the Triton servers"):
        TritonPool(URLS)


def test_outside_a_batch_calls_fail_over(world, inputs):
    """A single network call (no worker thread) goes to the next live server when one dies."""
    y, s = inputs
    world.die_after["a:1"] = 0
    with TritonPool(URLS[:2]) as pool:
        out = pool.unet(y[:2, :1], y[:2], torch.ones(2), s[:2])
    torch.testing.assert_close(out, PureNet().unet(y[:2, :1], y[:2], torch.ones(2), s[:2]))


def test_servers_with_other_models_are_refused(world):
    world.hashes["b:1"] = "u2"
    with pytest.raises(ValueError, match="serve different models"):
        TritonPool(URLS[:2])


def test_a_real_error_stops_the_pool(world, inputs):
    y, s = inputs

    def bad(i):
        raise RuntimeError(f"batch {i} is broken")

    with TritonPool(URLS) as pool:
        with pytest.raises(RuntimeError, match="is broken"):
            pool.map_batches(bad, 5)
        assert pool.live_urls == URLS  # not a server failure: nobody dropped
