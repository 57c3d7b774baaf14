"""KL to a frozen reference policy, estimated from the log-probabilities of the sampled steps."""

from __future__ import annotations

import torch


def k3_kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || pi_ref) from samples of pi, averaged over the batch:
    mean(exp(d) - d - 1) with d = log pi_ref(x) - log pi(x). Unbiased and never negative; its
    gradient reaches ``log_prob`` (``ref_log_prob`` is a constant)."""
    d = ref_log_prob - log_prob
    return (torch.exp(d) - d - 1).mean()
