"""KL to a frozen reference policy, estimated from the log-probabilities of the sampled steps."""

from __future__ import annotations

import torch


def k3_kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || pi_ref) from samples of pi, averaged over the batch:
    mean(exp(d) - d - 1) with d = log pi_ref(x) - log pi(x). Unbiased and never negative; its
    gradient reaches ``log_prob`` (``ref_log_prob`` is a constant)."""
    d = ref_log_prob - log_prob
    return (torch.exp(d) - d - 1).mean()


def noise_gap(output: torch.Tensor, ref_output: torch.Tensor) -> torch.Tensor:
    """The KL penalty of a deterministic-path learner (AlignProp, DRaFT, ReFL): the mean squared gap
    between the policy's and the reference's network outputs at the same ``x_t``.

    A stochastic DDIM step is Gaussian with a variance both policies share, so its KL is
    ``||mu - mu_ref||^2 / (2 sigma_t^2)``, and ``mu - mu_ref`` is the output gap times a per-step
    coefficient; summed over steps that bounds the KL of the final images (DPOK, Fan et al. 2023).
    Like DPOK's practice, the per-step coefficients are dropped (the last DDIM step has sigma 0),
    leaving ``mean((output - ref_output)^2)``; its gradient reaches ``output`` only."""
    return (output.float() - ref_output.detach().float()).pow(2).mean()
