"""DDIM step log-probabilities (armature.policies.logprob) against diffusers and a float64 reference."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from diffusers import DDIMScheduler

from armature.policies.logprob import ddim_step_with_logprob, gaussian_log_prob

SHAPE = (3, 4, 8, 8)  # [B, C, h, w]
# The implementation works in float32: at the last step 1 - a_t / a_prev ~ 1e-3 loses ~1e-5 of
# relative precision in sigma^2 (and 1 / sqrt(1 - a_t) amplifies rounding for sample prediction),
# so log-probs of magnitude ~2.5 agree with the float64 reference to ~1e-5 absolute + relative.
TOL = dict(atol=1e-5, rtol=1e-5)


def make_scheduler(prediction_type="epsilon", set_alpha_to_one=False, clip_sample=False, steps=10, steps_offset=1):
    # steps_offset=1 as in SD 1.5 / SDXL: timesteps 901, 801, ..., 1. With steps_offset=0 the last
    # step starts at t=0, where alpha_t == final_alpha_cumprod and the step has no variance.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=clip_sample,
        prediction_type=prediction_type,
        steps_offset=steps_offset,
    )
    if steps:
        scheduler.set_timesteps(steps)
    return scheduler


def reference_mean_std(scheduler, model_output, timesteps, sample, eta):
    """DDIM mean and sigma written out from Song et al. (2021) eq. 12 and 16, in float64.

    Coefficients are computed per sample with Python floats from ``scheduler.alphas_cumprod``;
    the previous timestep is t - 1000 // num_inference_steps, or the scheduler's
    ``final_alpha_cumprod`` once it drops below zero.
    """
    alphas = [float(a) for a in scheduler.alphas_cumprod.double()]
    final_alpha = float(scheduler.final_alpha_cumprod)
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prediction = scheduler.config.prediction_type
    means, stds = [], []
    for i, t in enumerate(int(t) for t in timesteps):
        a_t = alphas[t]
        a_prev = alphas[t - step] if t - step >= 0 else final_alpha
        x = sample[i].double()
        out = model_output[i].double()
        if prediction == "epsilon":
            eps = out
            x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        elif prediction == "v_prediction":
            # v = sqrt(a_t) eps - sqrt(1 - a_t) x0, x = sqrt(a_t) x0 + sqrt(1 - a_t) eps
            x0 = math.sqrt(a_t) * x - math.sqrt(1.0 - a_t) * out
            eps = math.sqrt(a_t) * out + math.sqrt(1.0 - a_t) * x
        elif prediction == "sample":
            x0 = out
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
        else:  # pragma: no cover
            raise AssertionError(prediction)
        if scheduler.config.clip_sample:
            limit = scheduler.config.clip_sample_range
            x0 = x0.clamp(-limit, limit)
        # eq. 16
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(1.0 - a_t / a_prev)
        # eq. 12: x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        means.append(math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma**2) * eps)
        stds.append(sigma)
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def reference_log_prob(mean, std, prev):
    std = std.reshape(-1, *([1] * (mean.ndim - 1))).expand_as(mean)
    lp = torch.distributions.Normal(mean, std).log_prob(prev.double())
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=g)
    model_output = torch.randn(SHAPE, generator=g)
    return sample, model_output


# ---------------------------------------------------------------------------- vs diffusers


@pytest.mark.parametrize(
    "prediction_type,clip_sample",
    [("epsilon", False), ("v_prediction", False), ("sample", False), ("epsilon", True)],
)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sampled_step_matches_diffusers(prediction_type, clip_sample, eta):
    scheduler = make_scheduler(prediction_type, clip_sample=clip_sample)
    assert len(scheduler.timesteps) == 10
    sample, model_output = random_inputs(0)
    if clip_sample:
        model_output = 3.0 * model_output  # so that x0 really leaves [-1, 1]
    for k, t in enumerate(scheduler.timesteps):  # includes the last step (prev_timestep < 0)
        seed = 1000 + k
        ours, _ = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(seed)
        )
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        theirs = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        assert ours.shape == sample.shape and ours.dtype == sample.dtype
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=f"timestep {int(t)}")
        # the generator's noise is really used: another seed gives another sample
        other, _ = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(seed + 1)
        )
        assert not torch.allclose(other, ours)


# ---------------------------------------------------------------------------- vs float64 reference


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [1.0, 0.7])
def test_log_prob_matches_independent_reference_every_step(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    sample, model_output = random_inputs(1)
    for k, t in enumerate(scheduler.timesteps):
        prev, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(k)
        )
        assert log_prob.shape == (SHAPE[0],)
        mean, std = reference_mean_std(scheduler, model_output, [int(t)] * SHAPE[0], sample, eta)
        expected = reference_log_prob(mean, std, prev)
        torch.testing.assert_close(log_prob.double(), expected, **TOL)
        # the sampled point is mean + std * z with z ~ N(0, 1): its standardised residual is O(1)
        z = (prev.double() - mean) / std.reshape(-1, 1, 1, 1)
        assert 0.5 < z.std().item() < 1.5 and abs(z.mean().item()) < 0.3


def test_last_step_uses_final_alpha_cumprod():
    scheduler = make_scheduler("epsilon")
    t_last = int(scheduler.timesteps[-1])
    step = 1000 // scheduler.num_inference_steps
    assert t_last - step < 0
    # with set_alpha_to_one=False the final alpha is alphas_cumprod[0], not 1
    assert float(scheduler.final_alpha_cumprod) == pytest.approx(float(scheduler.alphas_cumprod[0]))
    assert float(scheduler.final_alpha_cumprod) < 1.0

    sample, model_output = random_inputs(2)
    mean, std = reference_mean_std(scheduler, model_output, [t_last] * SHAPE[0], sample, 1.0)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    prev = (mean + std.reshape(-1, 1, 1, 1) * z).float()
    _, log_prob = ddim_step_with_logprob(scheduler, model_output, t_last, sample, prev_sample=prev)
    torch.testing.assert_close(log_prob.double(), reference_log_prob(mean, std, prev), **TOL)

    # final_alpha_cumprod equals alphas_cumprod[0] here, so a clamped index would go unnoticed:
    # give the scheduler another final alpha and check that it is the one used.
    scheduler.final_alpha_cumprod = torch.tensor(0.9998)
    mean2, std2 = reference_mean_std(scheduler, model_output, [t_last] * SHAPE[0], sample, 1.0)
    assert not torch.allclose(std2, std)
    _, log_prob2 = ddim_step_with_logprob(scheduler, model_output, t_last, sample, prev_sample=prev)
    torch.testing.assert_close(log_prob2.double(), reference_log_prob(mean2, std2, prev), **TOL)
    assert (log_prob2 - log_prob).abs().min() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_sample_timesteps(prediction_type):
    scheduler = make_scheduler(prediction_type)
    ts = scheduler.timesteps
    timesteps = torch.stack([ts[0], ts[4], ts[-1]])  # first, middle and last step in one batch
    assert len(set(timesteps.tolist())) == 3
    sample, model_output = random_inputs(4)
    prev, log_prob = ddim_step_with_logprob(
        scheduler, model_output, timesteps, sample, eta=1.0, generator=torch.Generator().manual_seed(0)
    )
    mean, std = reference_mean_std(scheduler, model_output, timesteps.tolist(), sample, 1.0)
    torch.testing.assert_close(log_prob.double(), reference_log_prob(mean, std, prev), **TOL)

    # each row equals the same row stepped alone with a scalar timestep
    for i, t in enumerate(timesteps.tolist()):
        _, lp_i = ddim_step_with_logprob(
            scheduler, model_output[i : i + 1], t, sample[i : i + 1], prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(lp_i[0], log_prob[i], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_scoring_reproduces_sampling_log_prob(prediction_type):
    scheduler = make_scheduler(prediction_type)
    sample, model_output = random_inputs(5)
    for k, t in enumerate(scheduler.timesteps):
        prev, lp_sampled = ddim_step_with_logprob(
            scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(k)
        )
        prev2, lp_scored = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=prev)
        assert torch.equal(prev2, prev)
        torch.testing.assert_close(lp_scored, lp_sampled, atol=1e-6, rtol=0)

        # a perturbed transition is less likely (on average over the batch)
        _, std = reference_mean_std(scheduler, model_output, [int(t)] * SHAPE[0], sample, 1.0)
        bump = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k))
        perturbed = prev + std.float().reshape(-1, 1, 1, 1) * bump
        _, lp_perturbed = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=perturbed)
        assert lp_perturbed.mean() < lp_sampled.mean() - 0.1


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(6)
    x, mean = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    std = torch.rand(2, 1, 1, generator=g) + 0.1
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- errors


def test_eta_zero_raises():
    scheduler = make_scheduler()
    sample, model_output = random_inputs(7)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[0], sample, eta=0.0)


def test_scheduler_without_set_timesteps_raises():
    scheduler = make_scheduler(steps=0)
    assert scheduler.num_inference_steps is None
    sample, model_output = random_inputs(8)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(scheduler, model_output, 500, sample)


def test_set_alpha_to_one_last_step_raises():
    scheduler = make_scheduler(set_alpha_to_one=True)
    sample, model_output = random_inputs(9)
    # earlier steps still have a density
    _, lp = ddim_step_with_logprob(
        scheduler, model_output, scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_step_with_logprob(
            scheduler, model_output, scheduler.timesteps[-1], sample, generator=torch.Generator().manual_seed(0)
        )
    # also when only one sample of a per-sample batch is at the last step
    mixed = torch.stack([scheduler.timesteps[0], scheduler.timesteps[1], scheduler.timesteps[-1]])
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_step_with_logprob(scheduler, model_output, mixed, sample, prev_sample=sample)


def test_zero_variance_last_step_from_t0_raises():
    # steps_offset=0: the last timestep is 0 and alpha_prev = final_alpha_cumprod = alphas_cumprod[0]
    # = alpha_t, so sigma = 0 and the transition has no density.
    scheduler = make_scheduler(steps_offset=0)
    assert int(scheduler.timesteps[-1]) == 0
    sample, model_output = random_inputs(12)
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(scheduler, model_output, 0, sample, prev_sample=sample)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("scored", [True, False])
def test_gradient_reaches_model_output(scored):
    """d log p / d eps_hat, derived by hand for epsilon prediction.

    mean = sqrt(a_prev) (x - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev - sigma^2) eps, so
    d mean / d eps = sqrt(1 - a_prev - sigma^2) - sqrt(a_prev (1 - a_t) / a_t), and
    d log p / d eps = (x_prev - mean) / sigma^2 * d mean / d eps / N   (N elements averaged).
    When the step is sampled, x_prev is treated as data (detached), as in DDPO.
    """
    scheduler = make_scheduler("epsilon")
    t = int(scheduler.timesteps[3])
    sample, model_output = random_inputs(10)
    model_output = model_output.clone().requires_grad_(True)
    if scored:
        prev = sample + 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
        prev, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=prev)
    else:
        prev, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(11)
        )
    assert log_prob.requires_grad
    log_prob.sum().backward()
    grad = model_output.grad
    assert grad is not None and grad.abs().sum() > 0

    mean, std = reference_mean_std(scheduler, model_output.detach(), [t] * SHAPE[0], sample, 1.0)
    a_t = float(scheduler.alphas_cumprod.double()[t])
    a_prev = float(scheduler.alphas_cumprod.double()[t - 100])
    sigma = float(std[0])
    dmean_deps = math.sqrt(1 - a_prev - sigma**2) - math.sqrt(a_prev * (1 - a_t) / a_t)
    n = math.prod(SHAPE[1:])
    expected = (prev.detach().double() - mean) / sigma**2 * dmean_deps / n
    torch.testing.assert_close(grad.double(), expected, atol=1e-6, rtol=1e-4)
