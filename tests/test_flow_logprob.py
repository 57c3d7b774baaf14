"""flow_sde_step_with_logprob against an independent calculation (per-element float64 loop
with scipy's normal log-density) and against diffusers' own Euler step."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy.stats import norm

from armature.policies import flow_sde_step_with_logprob


def scheduler(steps=6, shift=3.0, flux=False):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    if flux:
        sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    else:
        sched.set_timesteps(steps)
    return sched


def reference_log_prob(sched, v, t, x, x_next, a):
    """Per sample: look the step up by a Python loop, build the SDE's mean element by element
    from the paper's drift (Flow-GRPO eq. 9), score with scipy, then average."""
    sigmas = [float(s) for s in sched.sigmas]
    times = [float(u) for u in sched.timesteps]
    out = []
    for b in range(x.shape[0]):
        i = min(range(len(times)), key=lambda k: abs(times[k] - float(t[b])))
        s, s_next = sigmas[i], sigmas[i + 1]
        ratio = s / (1 - s) if s < 1 else s / (1 - sigmas[1])
        g = a * math.sqrt(ratio)
        dt = s_next - s
        xb, vb, nb = (arr[b].double().flatten().numpy() for arr in (x, v, x_next))
        drift = vb + g * g / (2 * s) * (xb + (1 - s) * vb)
        mean = xb + drift * dt
        std = g * math.sqrt(s - s_next)
        out.append(norm.logpdf(nb, loc=mean, scale=std).mean())
    return torch.tensor(out)


@pytest.mark.parametrize("flux", [False, True])
def test_noise_level_zero_is_the_schedulers_euler_step(flux):
    sched = scheduler(flux=flux)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        v = torch.randn(x.shape, generator=g)
        ours, log_prob = flow_sde_step_with_logprob(sched, v, t, x, noise_level=0.0)
        sched._step_index = None  # diffusers' step looks the index up from t
        theirs = sched.step(v, t, x).prev_sample
        assert torch.equal(ours, theirs)
        assert torch.equal(log_prob, torch.zeros(3))
        x = ours


@pytest.mark.parametrize("flux,a", [(False, 0.7), (True, 0.7), (False, 1.0)])
def test_scored_transition_matches_independent_calculation(flux, a):
    sched = scheduler(flux=flux)
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:  # includes sigma = 1 (the sigmas[1] substitution) and the last step
        x = torch.randn(2, 4, 6, 6, generator=g)
        v = torch.randn(x.shape, generator=g)
        x_next = torch.randn(x.shape, generator=g)
        _, ours = flow_sde_step_with_logprob(sched, v, t, x, noise_level=a, prev_sample=x_next)
        expected = reference_log_prob(sched, v, t.expand(2), x, x_next, a)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_sampled_step_is_mean_plus_scaled_noise_and_scores_itself():
    sched = scheduler()
    g = torch.Generator().manual_seed(2)
    t = sched.timesteps[2]
    x, v, noise = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    mean, _ = flow_sde_step_with_logprob(sched, v, t, x, noise_level=0.7, noise=torch.zeros_like(x))
    sampled, log_prob = flow_sde_step_with_logprob(sched, v, t, x, noise_level=0.7, noise=noise)
    s, s_next = float(sched.sigmas[2]), float(sched.sigmas[3])
    std = 0.7 * math.sqrt(s / (1 - s)) * math.sqrt(s - s_next)
    torch.testing.assert_close(sampled, mean + std * noise)
    _, rescored = flow_sde_step_with_logprob(sched, v, t, x, noise_level=0.7, prev_sample=sampled)
    torch.testing.assert_close(rescored, log_prob)
    # a seeded generator gives the same step twice
    a, _ = flow_sde_step_with_logprob(sched, v, t, x, generator=torch.Generator().manual_seed(5))
    b, _ = flow_sde_step_with_logprob(sched, v, t, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_batched_timesteps_equal_per_sample_calls():
    sched = scheduler(steps=5)
    g = torch.Generator().manual_seed(3)
    t = sched.timesteps[torch.tensor([0, 3, 4, 1])]
    x, v, x_next = (torch.randn(4, 4, 5, 5, generator=g) for _ in range(3))
    _, batched = flow_sde_step_with_logprob(sched, v, t, x, prev_sample=x_next)
    for b in range(4):
        _, single = flow_sde_step_with_logprob(sched, v[b : b + 1], t[b], x[b : b + 1], prev_sample=x_next[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], single)
    torch.testing.assert_close(batched.double(), reference_log_prob(sched, v, t, x, x_next, 0.7), rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused():
    sched = scheduler()
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        flow_sde_step_with_logprob(sched, x, torch.tensor(123.4), x)
    with pytest.raises(ValueError, match="deterministic"):
        flow_sde_step_with_logprob(sched, x, sched.timesteps[0], x, noise_level=0.0, prev_sample=x)
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_sde_step_with_logprob(FlowMatchEulerDiscreteScheduler(), x, 1000.0, x)
