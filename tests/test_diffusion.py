"""Tests of ftddm_trt.diffusion against diffusers / improved-diffusion and against an oracle predictor.

Small images (8x8) keep the 1000-step chains fast on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from ftddm_trt.diffusion import (
    CosineSchedule,
    RespacedSchedule,
    SampleResult,
    ancestral_sample,
    ddpm_timesteps,
    dpm_solver_pp_sample,
    dpm_solver_timesteps,
    draw_ancestral_noise,
    eps_loss,
    flow_guide_loss,
    flow_loss,
    initial_noise,
    lambda_clipped_start,
    lambda_clipped_timesteps,
    respaced_timesteps,
    sample_train_timesteps,
    truncated_timesteps,
)

diffusers = pytest.importorskip("diffusers")

B, H = 2, 8


@pytest.fixture(scope="module")
def sched() -> CosineSchedule:
    return CosineSchedule()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """A mask with a zero background band and an x0 that is zero outside it."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, 1, H, H)
    mask[:, :, :2] = 0
    mask[1, :, :, -3:] = 0
    x0 = (torch.rand(B, 1, H, H, generator=g) * 1.5 - 0.2) * mask
    return mask, x0


def oracle(sched: CosineSchedule, x0: torch.Tensor, record: list | None = None, perturb: torch.Tensor | None = None):
    """eps_fn returning the exact eps for the known x0: eps = (x_t - sqrt(g_t) x0) / sqrt(1 - g_t)
    (plus an optional smooth x-dependent perturbation, to make trajectories non-trivial)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        if record is not None:
            record.append((x.clone(), int(t[0])))
        g = sched.gammas[t.long()].view(-1, 1, 1, 1)
        eps = ((x.double() - g.sqrt() * x0.double()) / (1 - g).sqrt()).to(x.dtype)
        if perturb is not None:
            eps = eps + 0.05 * torch.tanh(x * (1 + perturb))
        return eps

    return eps_fn


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_diffusers(sched):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert sched.T == 1000 and sched.gammas[0] == 1.0 and sched.betas[0] == 0.0
    torch.testing.assert_close(sched.betas[1:], ref.betas.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.gammas[1:], ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    assert sched.betas[-1].item() == pytest.approx(0.999)


def test_schedule_posterior_and_forward(sched):
    t = torch.tensor([1, 2, 500, 1000])
    g, gp, b = sched.gammas[t], sched.gammas[t - 1], sched.betas[t]
    torch.testing.assert_close(sched.posterior_variance(t), (1 - gp) / (1 - g) * b)
    assert sched.posterior_variance(1).item() == 0.0
    c0, ct = sched.posterior_mean_coefs(t)
    assert c0[0].item() == pytest.approx(1.0) and ct[0].item() == pytest.approx(0.0, abs=1e-12)
    # q_sample / predict_x0 round trip; noise only inside the mask
    x0 = torch.randn(4, 1, H, H, dtype=torch.float64)
    eps = torch.randn_like(x0)
    mask = torch.ones_like(x0)
    mask[..., :3] = 0
    x_t = sched.q_sample(x0, t, eps, mask)
    torch.testing.assert_close(x_t[..., :3], g.sqrt().view(-1, 1, 1, 1) * x0[..., :3])
    torch.testing.assert_close(sched.predict_x0(x_t, t, eps * mask), x0)


def test_respaced_betas_match_improved_diffusion(sched):
    kept = respaced_timesteps(1000, 100)
    # improved-diffusion's space_timesteps(1000, "100"), 0-based, plus one
    frac, cur, ref = 999 / 99, 0.0, []
    for _ in range(100):
        ref.append(round(cur) + 1)
        cur += frac
    assert kept == sorted(ref, reverse=True) and kept[0] == 1000 and kept[-1] == 1 and len(kept) == 100
    rs = sched.respaced(kept)
    assert isinstance(rs, RespacedSchedule) and rs.T == 100
    # brute-force SpacedDiffusion: walk all original steps, emit a beta at each kept one
    last, new_betas, tmap = 1.0, [], []
    for t in range(1, 1001):
        ac = float(sched.gammas[t])
        if t in set(kept):
            new_betas.append(1 - ac / last)
            last = ac
            tmap.append(t)
    torch.testing.assert_close(rs.betas[1:], torch.tensor(new_betas, dtype=torch.float64), rtol=1e-12, atol=0)
    assert rs.timestep_map.tolist() == [0] + tmap
    assert torch.equal(rs.gammas, sched.gammas[rs.timestep_map])
    torch.testing.assert_close(torch.cumprod(1 - rs.betas, 0), rs.gammas, rtol=1e-10, atol=0)
    # consecutive steps give back the original betas
    tr = sched.respaced(range(1, 101))
    torch.testing.assert_close(tr.betas, sched.betas[:101], rtol=1e-12, atol=1e-15)


def test_timestep_helpers():
    assert ddpm_timesteps(5) == [5, 4, 3, 2, 1]
    assert truncated_timesteps(3) == [3, 2, 1]
    assert respaced_timesteps(10, 10) == list(range(10, 0, -1))
    assert dpm_solver_timesteps(100, 10) == list(range(100, -1, -10))
    grid = dpm_solver_timesteps(100, 100)
    assert grid == list(range(100, -1, -1))


# ---------------------------------------------------------------------------------------------- ancestral
@pytest.mark.parametrize("tau_d", [0.9, 1.0])
@pytest.mark.parametrize(
    "chain", ["full", "respaced", "truncated", "respaced_truncated"]
)
def test_ancestral_oracle_recovers_x0(sched, data, chain, tau_d):
    mask, x0 = data
    gen = torch.Generator().manual_seed(3)
    if chain == "full":
        ts, x_start = ddpm_timesteps(1000), initial_noise(mask, gen)
    elif chain == "respaced":
        ts, x_start = respaced_timesteps(1000, 100), initial_noise(mask, gen)
    else:
        ts = truncated_timesteps(100) if chain == "truncated" else respaced_timesteps(100, 10)
        x_start = sched.q_sample(x0, torch.full((B,), 100), torch.randn(x0.shape, generator=gen), mask)
    seen: list = []
    calls: list = []
    res = ancestral_sample(
        oracle(sched, x0, seen), x_start, mask, sched, ts, tau_d=tau_d, generator=gen,
        progress=lambda i, n: calls.append((i, n)),
    )
    assert isinstance(res, SampleResult)
    assert res.nfe == len(ts) == len(seen)
    assert [t for _, t in seen] == ts  # the network is fed the original t
    assert calls == [(i, len(ts)) for i in range(len(ts))]
    torch.testing.assert_close(res.x0, x0, atol=1e-5, rtol=0)
    assert res.x0.dtype == x0.dtype
    assert torch.count_nonzero(res.x0[mask == 0]) == 0  # background exactly zero
    assert all(torch.count_nonzero(x[mask == 0]) == 0 for x, _ in seen)


def test_ancestral_nfe(sched, data):
    mask, _ = data
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = initial_noise(mask)
    assert ancestral_sample(zero, x, mask, sched, ddpm_timesteps(1000)).nfe == 1000
    assert ancestral_sample(zero, x, mask, sched, respaced_timesteps(1000, 50)).nfe == 50
    assert ancestral_sample(zero, x, mask, sched, truncated_timesteps(100)).nfe == 100


@pytest.mark.parametrize("chain", ["full", "respaced"])
def test_ancestral_matches_diffusers_ddpm(sched, data, chain):
    """tau_d = 1, no mask: the chain is diffusers' DDPMScheduler (fixed_small, no clipping), same noise draws."""
    _, x0 = data
    perturb = torch.randn(1, 1, H, H, generator=torch.Generator().manual_seed(7)) * 0.3
    eps_fn = oracle(sched, x0, perturb=perturb)
    ts = ddpm_timesteps(1000) if chain == "full" else respaced_timesteps(1000, 100)
    x_start = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    ours = ancestral_sample(eps_fn, x_start, None, sched, ts, tau_d=1.0, generator=torch.Generator().manual_seed(11))

    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type="fixed_small"
    )
    ref.alphas_cumprod = sched.gammas[1:].clone()  # isolate the sampler from diffusers' float32 cumprod
    ref.set_timesteps(timesteps=[t - 1 for t in ts])
    gen, x = torch.Generator().manual_seed(11), x_start.clone()
    for k in ref.timesteps:
        e = eps_fn(x, torch.full((B,), float(k + 1)))
        x = ref.step(e, k, x, generator=gen).prev_sample
    torch.testing.assert_close(ours.x0, x.float(), atol=1e-5, rtol=1e-5)


def test_ancestral_predrawn_noise_and_clip(sched, data):
    mask, x0 = data
    perturb = torch.randn(1, 1, H, H, generator=torch.Generator().manual_seed(8)) * 0.3
    eps_fn = oracle(sched, x0, perturb=perturb)
    ts = truncated_timesteps(50)
    x_start = sched.q_sample(x0, torch.full((B,), 50), torch.randn_like(x0), mask)
    a = ancestral_sample(eps_fn, x_start, mask, sched, ts, generator=torch.Generator().manual_seed(1))
    noise = draw_ancestral_noise(len(ts), x_start, torch.Generator().manual_seed(1))
    assert noise.shape == (len(ts) - 1, B, 1, H, H)
    b = ancestral_sample(eps_fn, x_start, mask, sched, ts, noise=noise)
    assert torch.equal(a.x0, b.x0)
    c = ancestral_sample(eps_fn, x_start, mask, sched, ts, noise=noise, clip=(-1e6, 1e6))  # posterior-mean form
    torch.testing.assert_close(c.x0, a.x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        ancestral_sample(eps_fn, x_start, mask, sched, ts, noise=noise[:-1])
    with pytest.raises(ValueError):
        ancestral_sample(eps_fn, x_start, mask, sched, [1, 2, 3])


# ---------------------------------------------------------------------------------------------- DPM-Solver++
def _diffusers_dpm(sched, eps_fn, x_start, mask, grid, patch: bool):
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    if patch:
        ref.alphas_cumprod = sched.gammas[1:].clone()  # float64 schedule; the solver is still float32 there
    ref.set_timesteps(timesteps=[t - 1 for t in grid[:-1]])
    assert ref.sigmas[-1].item() == 0.0
    x = x_start.clone()
    for k in ref.timesteps:
        e = eps_fn(x, torch.full((x.shape[0],), float(k + 1))) * mask
        x = ref.step(e, k, x).prev_sample
    return x


@pytest.mark.parametrize("t_start,steps", [(1000, 20), (100, 10)])
def test_dpm_solver_matches_diffusers(sched, data, t_start, steps):
    mask, x0 = data
    perturb = torch.randn(1, 1, H, H, generator=torch.Generator().manual_seed(9)) * 0.3
    gen = torch.Generator().manual_seed(4)
    if t_start == 1000:
        x_start = initial_noise(mask, gen)
    else:
        x_start = sched.q_sample(x0, torch.full((B,), t_start), torch.randn(x0.shape, generator=gen), mask)
    grid = dpm_solver_timesteps(t_start, steps)
    assert grid[0] == t_start and grid[-1] == 0 and len(grid) == steps + 1

    ours_seen: list = []
    ours = dpm_solver_pp_sample(oracle(sched, x0, ours_seen, perturb), x_start, mask, sched, t_start, steps)
    assert ours.nfe == steps == len(ours_seen)
    assert [t for _, t in ours_seen] == grid[:-1]
    assert torch.count_nonzero(ours.x0[mask == 0]) == 0

    def rel(a, b):
        return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()

    for patch, tol in [(True, 2e-6), (False, 1e-4)]:
        ref_seen: list = []
        ref = _diffusers_dpm(sched, oracle(sched, x0, ref_seen, perturb), x_start, mask, grid, patch)
        assert [t for _, t in ref_seen] == grid[:-1]
        errs = [rel(a, b) for (a, _), (b, _) in zip(ours_seen, ref_seen)] + [rel(ours.x0, ref)]
        assert max(errs) < tol, (patch, errs)


@pytest.mark.parametrize("t_start,steps", [(1000, 20), (100, 10), (100, 1)])
def test_dpm_solver_oracle_recovers_x0(sched, data, t_start, steps):
    mask, x0 = data
    gen = torch.Generator().manual_seed(2)
    x_start = (
        initial_noise(mask, gen)
        if t_start == 1000
        else sched.q_sample(x0, torch.full((B,), t_start), torch.randn(x0.shape, generator=gen), mask)
    )
    res = dpm_solver_pp_sample(oracle(sched, x0), x_start, mask, sched, t_start, steps)
    assert res.nfe == steps
    torch.testing.assert_close(res.x0, x0, atol=1e-5, rtol=0)
    assert torch.count_nonzero(res.x0[mask == 0]) == 0


def _diffusers_dpm_clipped(sched, eps_fn, x_start, mask, steps: int, lambda_min: float, patch: bool):
    """diffusers choosing its own timesteps with lambda_min_clipped (no timesteps= override)."""
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", lambda_min_clipped=lambda_min,
    )
    if patch:
        ref.alphas_cumprod = sched.gammas[1:].clone()  # sigmas from our float64 table; lambda_t stays diffusers'
    ref.set_timesteps(steps)
    x = x_start.clone()
    for k in ref.timesteps:
        x = ref.step(eps_fn(x, torch.full((x.shape[0],), float(k + 1))) * mask, k, x).prev_sample
    return x, [int(k) + 1 for k in ref.timesteps]


@pytest.mark.parametrize("lambda_min", [-5.1, -4.0, -2.5, -float("inf")])
def test_lambda_clipped_start_matches_diffusers(sched, lambda_min):
    """Our (float64) clip point equals where diffusers' (float32) scheduler starts, 1-based."""
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                algorithm_type="dpmsolver++", lambda_min_clipped=lambda_min)
    for steps in (100, 20, 10):
        ref.set_timesteps(steps)
        grid = lambda_clipped_timesteps(sched, steps, lambda_min)
        assert grid[:-1] == [int(k) + 1 for k in ref.timesteps] and grid[-1] == 0
    t0 = lambda_clipped_start(sched, lambda_min)

    def lam(t: int) -> float:
        return 0.5 * math.log(float(sched.gammas[t]) / (1 - float(sched.gammas[t])))

    assert lam(t0) >= lambda_min and (t0 == 1000 or lam(t0 + 1) < lambda_min)
    if lambda_min == -5.1:
        assert t0 == 996  # the cosine chain's last 4 steps, where sigma/alpha > 160, are skipped
    assert lambda_clipped_timesteps(sched, 10, lambda_min, t_max=100)[0] == 100  # never above t_max
    with pytest.raises(ValueError):
        lambda_clipped_start(sched, 100.0)


@pytest.mark.parametrize("steps", [20, 10, 100])
def test_dpm_solver_lambda_clipped_matches_diffusers(sched, data, steps):
    """From pure noise with lambda_min_clipped = -5.1, step by step against diffusers (its own timesteps)."""
    mask, x0 = data
    perturb = torch.randn(1, 1, H, H, generator=torch.Generator().manual_seed(9)) * 0.3
    x_start = initial_noise(mask, torch.Generator().manual_seed(4))
    ours_seen: list = []
    ours = dpm_solver_pp_sample(
        oracle(sched, x0, ours_seen, perturb), x_start, mask, sched, 1000, steps, lambda_min=-5.1
    )
    assert ours.nfe == steps == len(ours_seen)
    assert ours_seen[0][1] == 996
    assert torch.count_nonzero(ours.x0[mask == 0]) == 0

    def rel(a, b):
        return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()

    for patch, tol in [(True, 2e-6), (False, 1e-4)]:
        ref_seen: list = []
        ref, ref_ts = _diffusers_dpm_clipped(
            sched, oracle(sched, x0, ref_seen, perturb), x_start, mask, steps, -5.1, patch
        )
        assert [t for _, t in ours_seen] == ref_ts == [t for _, t in ref_seen]
        errs = [rel(a, b) for (a, _), (b, _) in zip(ours_seen, ref_seen)] + [rel(ours.x0, ref)]
        assert max(errs) < tol, (patch, errs)
    # the oracle's data prediction is exact from the first step: the clipped solver recovers x0
    exact = dpm_solver_pp_sample(oracle(sched, x0), x_start, mask, sched, 1000, steps, lambda_min=-5.1)
    torch.testing.assert_close(exact.x0, x0, atol=1e-5, rtol=0)


def _diffusers_sde_dpm(sched, eps_fn, x_start, mask, steps: int, noises: list, t_start: int):
    """diffusers' sde-dpmsolver++ (2M, midpoint) on our float64 schedule, fed the given noise at each step."""
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", algorithm_type="sde-dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", lambda_min_clipped=-5.1,
    )
    ref.alphas_cumprod = sched.gammas[1:].clone()
    if t_start == 1000:
        ref.set_timesteps(steps)  # its own lambda-clipped grid
    else:
        ref.set_timesteps(timesteps=[t - 1 for t in dpm_solver_timesteps(t_start, steps)[:-1]])
    x = x_start.clone()
    for i, k in enumerate(ref.timesteps):
        e = eps_fn(x, torch.full((x.shape[0],), float(k + 1))) * mask
        x = ref.step(e, k, x, variance_noise=noises[i]).prev_sample
    return x


@pytest.mark.parametrize("t_start,steps,tau", [(1000, 20, 1.0), (1000, 10, 0.9), (100, 10, 0.9)])
def test_sde_dpm_solver_matches_diffusers(sched, data, t_start, steps, tau):
    """The SDE form, step by step against diffusers' sde-dpmsolver++ given the same noise (times tau, times M)."""
    mask, x0 = data
    perturb = torch.randn(1, 1, H, H, generator=torch.Generator().manual_seed(9)) * 0.3
    g = torch.Generator().manual_seed(4)
    x_start = (initial_noise(mask, g) if t_start == 1000
               else sched.q_sample(x0, torch.full((B,), t_start), torch.randn(x0.shape, generator=g), mask))
    lam = -5.1 if t_start == 1000 else None
    ours_seen: list = []
    ours = dpm_solver_pp_sample(oracle(sched, x0, ours_seen, perturb), x_start, mask, sched, t_start, steps,
                                lambda_min=lam, sde=True, tau=tau, generator=torch.Generator().manual_seed(5))
    assert ours.nfe == steps == len(ours_seen)
    assert torch.count_nonzero(ours.x0[mask == 0]) == 0
    # our draws: one unit normal per step except the last (noise level 0 there), from the generator
    g5 = torch.Generator().manual_seed(5)
    zs = [torch.randn(x_start.shape, generator=g5) for _ in range(steps - 1)]
    noises = [tau * z * mask for z in zs] + [torch.zeros_like(x_start)]
    ref_seen: list = []
    ref = _diffusers_sde_dpm(sched, oracle(sched, x0, ref_seen, perturb), x_start, mask, steps, noises, t_start)
    assert [t for _, t in ours_seen] == [t for _, t in ref_seen]

    def rel(a, b):
        return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()

    errs = [rel(a, b) for (a, _), (b, _) in zip(ours_seen, ref_seen)] + [rel(ours.x0, ref)]
    assert max(errs) < 2e-5, errs
    # the noise matters: another seed gives another trajectory (the oracle pulls both to x0 at the end)
    other_seen: list = []
    dpm_solver_pp_sample(oracle(sched, x0, other_seen, perturb), x_start, mask, sched, t_start, steps,
                         lambda_min=lam, sde=True, tau=tau, generator=torch.Generator().manual_seed(6))
    assert (other_seen[1][0] - ours_seen[1][0]).abs().max() > 0.1 * tau
    # with the exact data prediction the SDE still lands on x0 (D = x0 at every step, the last step returns it)
    exact = dpm_solver_pp_sample(oracle(sched, x0), x_start, mask, sched, t_start, steps, lambda_min=lam, sde=True,
                                 tau=tau, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(exact.x0, x0, atol=1e-5, rtol=0)


def test_sde_dpm_solver_keeps_the_forward_marginal(sched):
    """Closed form: with the exact data prediction of a point x0, the SDE form at tau = 1 samples the forward
    marginal q(x_t | x0) = N(alpha_t x0, sigma_t^2) at every grid point (brute force over many chains)."""
    n, x0v = 20000, 0.7
    x0 = torch.full((n, 1, 1, 1), x0v)
    grid = dpm_solver_timesteps(100, 5)
    seen: list = []
    x_start = sched.q_sample(
        x0, torch.full((n,), 100), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    )
    dpm_solver_pp_sample(oracle(sched, x0, seen), x_start, None, sched, 100, 5, sde=True,
                         generator=torch.Generator().manual_seed(1))
    for (x, t), t_grid in zip(seen, grid):
        assert t == t_grid
        g = float(sched.gammas[t])
        assert abs(x.mean().item() - math.sqrt(g) * x0v) < 0.03 * math.sqrt(1 - g) + 1e-3
        assert x.std().item() == pytest.approx(math.sqrt(1 - g), rel=0.03)


# ---------------------------------------------------------------------------------------------- losses
def test_losses():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2, :] = 1
    assert eps_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item())
    assert eps_loss(a, b, mask).item() == pytest.approx(((a - b)[..., :2, :] ** 2).mean().item(), rel=1e-6)

    t = sample_train_timesteps(10000, 100, torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and int(t.min()) == 1 and int(t.max()) == 100

    fake_ssim = lambda x, y: torch.full((x.shape[0],), 0.75)  # noqa: E731
    guide = flow_guide_loss(a, b, mask, ms_ssim_fn=fake_ssim)
    l1 = (a - b)[..., :2, :].abs().mean().item()
    assert guide.item() == pytest.approx(0.16 * l1 + 0.84 * 0.25, rel=1e-6)
    assert flow_loss(torch.tensor([1.0, 3.0]), torch.tensor(0.5)).item() == pytest.approx(2.0 + 5.0)
    assert math.isclose(flow_loss(torch.tensor(1.0), torch.tensor(0.1), lam=1.0).item(), 1.1, rel_tol=1e-6)
