"""DDPO loss and reward normalisation (armature.losses) against hand-written calculations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import numpy as np
import pytest
import torch

from armature.losses import PerPromptStatTracker, ddpo_loss, normalize_rewards

# ---------------------------------------------------------------------------- ddpo_loss


def hand_ddpo(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """The PPO-clipped objective element by element with Python floats."""
    terms, sq, clipped = [], [], []
    for lp, old, adv in zip(log_prob, old_log_prob, advantages):
        a = min(max(float(adv), -adv_clip_max), adv_clip_max)
        delta = float(lp) - float(old)
        r = math.exp(delta)
        r_clip = min(max(r, 1.0 - clip_range), 1.0 + clip_range)
        terms.append(max(-a * r, -a * r_clip))
        sq.append(delta * delta)
        clipped.append(1.0 if abs(r - 1.0) > clip_range else 0.0)
    n = len(terms)
    return sum(terms) / n, 0.5 * sum(sq) / n, sum(clipped) / n


def hand_grad(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """d loss / d log_prob_i.

    With a = clipped advantage and r = exp(lp - old): if the clipped term is strictly the larger
    one (a > 0 and r > 1 + c, or a < 0 and r < 1 - c) the element contributes a constant, so its
    gradient is 0; otherwise the loss term is -a * r, whose derivative in lp is -a * r. Divided by N.
    """
    n = len(log_prob)
    grads = []
    for lp, old, adv in zip(log_prob, old_log_prob, advantages):
        a = min(max(float(adv), -adv_clip_max), adv_clip_max)
        r = math.exp(float(lp) - float(old))
        clipped_is_max = (a > 0 and r > 1 + clip_range) or (a < 0 and r < 1 - clip_range)
        grads.append(0.0 if clipped_is_max else -a * r / n)
    return grads


def run_loss(lp, old, adv, clip_range, adv_clip_max):
    lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    loss, info = ddpo_loss(
        lp_t,
        torch.tensor(old, dtype=torch.float64),
        torch.tensor(adv, dtype=torch.float64),
        clip_range,
        adv_clip_max,
    )
    return lp_t, loss, info


# ratios exp(lp - old): 1.5, 0.5, 1.05, 0.95 for each sign of the advantage, plus advantages
# beyond adv_clip_max = 2 and a zero advantage.
RATIOS = [1.5, 0.5, 1.05, 0.95, 1.5, 0.5, 1.05, 0.95, 1.3, 0.6, 1.0]
ADVS = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 7.0, -9.0, 0.0]
OLD = [-0.3 * i for i in range(len(RATIOS))]
LP = [o + math.log(r) for o, r in zip(OLD, RATIOS)]


def test_ddpo_loss_matches_hand_calculation_with_clipping():
    lp_t, loss, info = run_loss(LP, OLD, ADVS, 0.2, 2.0)
    expected_loss, expected_kl, expected_clipfrac = hand_ddpo(LP, OLD, ADVS, 0.2, 2.0)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert info["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-12)
    # ratios 1.5, 0.5 (twice each), 1.3, 0.6 are outside [0.8, 1.2]
    assert expected_clipfrac == pytest.approx(6 / 11)
    assert info["clipfrac"].item() == pytest.approx(expected_clipfrac)
    # clipping binds: the unclipped mean(-A * r) is different
    unclipped = np.mean([-min(max(a, -2.0), 2.0) * r for a, r in zip(ADVS, RATIOS)])
    assert abs(expected_loss - unclipped) > 0.05
    assert not info["approx_kl"].requires_grad and not info["clipfrac"].requires_grad


def test_ddpo_loss_gradient_is_zero_where_the_clipped_term_binds():
    lp_t, loss, _ = run_loss(LP, OLD, ADVS, 0.2, 2.0)
    loss.backward()
    expected = hand_grad(LP, OLD, ADVS, 0.2, 2.0)
    np.testing.assert_allclose(lp_t.grad.numpy(), expected, atol=1e-12, rtol=1e-9)
    grad = lp_t.grad.tolist()
    # element 0: A=1, r=1.5 > 1.2 -> clipped term is the max -> no gradient
    assert grad[0] == 0.0
    # element 5: A=-1, r=0.5 < 0.8 -> clipped term is the max -> no gradient
    assert grad[5] == 0.0
    # element 8: A clipped 7 -> 2, r=1.3 -> no gradient; element 9: A -9 -> -2, r=0.6 -> none
    assert grad[8] == 0.0 and grad[9] == 0.0
    # element 1: A=1, r=0.5 -> the unclipped term is the max -> gradient -A r / N
    assert grad[1] == pytest.approx(-1.0 * 0.5 / len(LP))
    # element 4: A=-1, r=1.5 -> unclipped is the max -> gradient +1.5 / N
    assert grad[4] == pytest.approx(1.5 / len(LP))
    # zero advantage -> no gradient
    assert grad[10] == 0.0


def test_ddpo_loss_without_binding_clip_is_plain_policy_gradient():
    rng = np.random.default_rng(0)
    old = rng.normal(size=64)
    lp = old + rng.normal(scale=0.01, size=64)  # ratios within 1 +- 0.05
    adv = rng.normal(size=64)
    lp_t, loss, info = run_loss(lp.tolist(), old.tolist(), adv.tolist(), 0.2, 10.0)
    ratio = np.exp(lp - old)
    assert loss.item() == pytest.approx(float(np.mean(-adv * ratio)), abs=1e-12)
    assert info["clipfrac"].item() == 0.0
    assert info["approx_kl"].item() == pytest.approx(0.5 * float(np.mean((lp - old) ** 2)), rel=1e-9)
    loss.backward()
    np.testing.assert_allclose(lp_t.grad.numpy(), -adv * ratio / 64, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("clip_range,adv_clip_max", [(0.1, 1.0), (1e-4, 5.0), (0.0, 2.0)])
def test_ddpo_loss_random_against_loop(seed, clip_range, adv_clip_max):
    rng = np.random.default_rng(seed)
    old = rng.normal(size=50)
    lp = old + rng.normal(scale=0.3, size=50)
    adv = rng.normal(scale=2.0, size=50)
    lp_t, loss, info = run_loss(lp.tolist(), old.tolist(), adv.tolist(), clip_range, adv_clip_max)
    expected_loss, expected_kl, expected_clipfrac = hand_ddpo(lp, old, adv, clip_range, adv_clip_max)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert info["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-12)
    assert info["clipfrac"].item() == pytest.approx(expected_clipfrac)
    assert 0.0 < expected_clipfrac  # clipping binds somewhere in these cases
    loss.backward()
    np.testing.assert_allclose(
        lp_t.grad.numpy(), hand_grad(lp, old, adv, clip_range, adv_clip_max), atol=1e-12, rtol=1e-9
    )


def test_ddpo_loss_float32_and_identical_policy():
    # at the sampling weights the ratio is 1: loss = -mean(clip(A)), kl = clipfrac = 0
    old = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    adv = torch.tensor([3.0, -0.5, 1.0, -4.0])
    loss, info = ddpo_loss(old.clone(), old, adv, 0.2, 2.0)
    assert loss.item() == pytest.approx(-(2.0 - 0.5 + 1.0 - 2.0) / 4, abs=1e-7)
    assert info["approx_kl"].item() == 0.0 and info["clipfrac"].item() == 0.0
    # clipfrac counts |ratio - 1| strictly above clip_range: nothing is clipped at ratio 1, c = 0
    loss0, info0 = ddpo_loss(old.clone(), old, adv, 0.0, 2.0)
    assert info0["clipfrac"].item() == 0.0
    assert loss0.item() == pytest.approx(loss.item(), abs=1e-7)


@pytest.mark.parametrize("clip_range,adv_clip_max", [(-0.1, 1.0), (0.2, 0.0), (0.2, -1.0)])
def test_ddpo_loss_rejects_bad_hyperparameters(clip_range, adv_clip_max):
    x = torch.zeros(3)
    with pytest.raises(ValueError):
        ddpo_loss(x, x, x, clip_range, adv_clip_max)


# ---------------------------------------------------------------------------- normalisation


def pop_mean_std(values):
    """Mean and population (ddof=0) standard deviation, as DDPO's np.std, by hand."""
    values = [float(v) for v in values]
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def test_normalize_rewards_hand_calc():
    rewards = [1.0, 4.0, -2.0, 7.5, 0.0]
    m, s = pop_mean_std(rewards)
    out = normalize_rewards(np.array(rewards))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [(r - m) / (s + 1e-6) for r in rewards], rtol=1e-6, atol=1e-6)
    assert abs(float(out.mean())) < 1e-6 and float(out.std()) == pytest.approx(1.0, rel=1e-5)
    # a constant batch gives zeros, not NaNs
    np.testing.assert_array_equal(normalize_rewards(np.full(4, 3.0)), np.zeros(4, np.float32))
    # eps is used
    np.testing.assert_allclose(normalize_rewards(np.array([0.0, 2.0]), eps=1.0), [-0.5, 0.5], rtol=1e-6)


def test_per_prompt_uses_prompt_stats_after_min_count_and_batch_stats_before():
    tracker = PerPromptStatTracker(buffer_size=10, min_count=3)
    eps = tracker.eps

    # batch 1: "a" has 2 rewards, "b" has 1 -> both below min_count -> batch statistics
    prompts1, rewards1 = ["a", "b", "a"], [1.0, 10.0, 2.0]
    adv1 = tracker.update(prompts1, np.array(rewards1))
    m, s = pop_mean_std(rewards1)
    np.testing.assert_allclose(adv1, [(r - m) / (s + eps) for r in rewards1], rtol=1e-6)
    assert adv1.dtype == np.float32

    # batch 2: "a" reaches 4 rewards -> its own buffer [1, 2, 4, 6]; "b" has 2 -> batch stats
    prompts2, rewards2 = ["a", "b", "a"], [4.0, 20.0, 6.0]
    adv2 = tracker.update(prompts2, np.array(rewards2))
    ma, sa = pop_mean_std([1.0, 2.0, 4.0, 6.0])
    mb, sb = pop_mean_std(rewards2)
    expected = [(4.0 - ma) / (sa + eps), (20.0 - mb) / (sb + eps), (6.0 - ma) / (sa + eps)]
    np.testing.assert_allclose(adv2, expected, rtol=1e-6)

    # batch 3: "b" reaches exactly min_count=3 with [10, 20, 30] -> its own statistics
    adv3 = tracker.update(["b"], np.array([30.0]))
    mb, sb = pop_mean_std([10.0, 20.0, 30.0])
    np.testing.assert_allclose(adv3, [(30.0 - mb) / (sb + eps)], rtol=1e-6)
    # (the batch fallback would have given (30 - 30) / (0 + eps) = 0)
    assert adv3[0] != 0.0


def test_per_prompt_buffer_keeps_only_last_n():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a", "a"], np.array([1.0, 2.0]))
    tracker.update(["a", "a", "a"], np.array([3.0, 4.0, 5.0]))
    assert tracker.state_dict()["history"]["a"] == [3.0, 4.0, 5.0]
    adv = tracker.update(["a"], np.array([100.0]))
    m, s = pop_mean_std([4.0, 5.0, 100.0])  # not over all six rewards
    np.testing.assert_allclose(adv, [(100.0 - m) / (s + tracker.eps)], rtol=1e-6)
    m_all, s_all = pop_mean_std([1, 2, 3, 4, 5, 100])
    assert abs(adv[0] - (100.0 - m_all) / s_all) > 0.1
    assert tracker.state_dict()["history"]["a"] == [4.0, 5.0, 100.0]

    # more rewards of one prompt in a single batch than the buffer holds: last N of the batch
    tracker2 = PerPromptStatTracker(buffer_size=2, min_count=2)
    rewards = np.array([1.0, 2.0, 3.0, 10.0])
    adv = tracker2.update(["p"] * 4, rewards)
    m, s = pop_mean_std([3.0, 10.0])
    np.testing.assert_allclose(adv, (rewards - m) / (s + tracker2.eps), rtol=1e-6)


def test_per_prompt_state_dict_round_trip():
    rng = np.random.default_rng(0)
    prompts_pool = ["cat", "dog", "hand", "face"]

    def batch(n=6):
        return [prompts_pool[i] for i in rng.integers(0, 4, size=n)], rng.normal(size=n)

    tracker = PerPromptStatTracker(buffer_size=5, min_count=3)
    for _ in range(4):
        tracker.update(*batch())
    state = tracker.state_dict()
    state = json.loads(json.dumps(state))  # checkpointable as JSON

    restored = PerPromptStatTracker(buffer_size=99, min_count=1)  # overwritten by the state
    restored.load_state_dict(state)
    assert (restored.buffer_size, restored.min_count) == (5, 3)

    fresh = PerPromptStatTracker(buffer_size=5, min_count=3)
    differs = False
    for _ in range(5):
        prompts, rewards = batch()
        a = tracker.update(prompts, rewards)
        b = restored.update(prompts, rewards)
        np.testing.assert_array_equal(a, b)
        differs |= not np.array_equal(a, fresh.update(prompts, rewards))
    assert differs  # the history matters, so the round trip tested something
    assert restored.state_dict() == tracker.state_dict()


def test_per_prompt_rejects_bad_input():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    with pytest.raises(ValueError):
        tracker.update(["a", "b"], np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        tracker.update(["a", "b", "c"], np.array([1.0]))
    assert tracker.state_dict()["history"] == {}  # nothing recorded from a rejected batch
    with pytest.raises(ValueError):
        PerPromptStatTracker(buffer_size=0)
    with pytest.raises(ValueError):
        PerPromptStatTracker(min_count=0)


# ---------------------------------------------------------------------------- decoupled PPO
def hand_decoupled(lp, prox, behav, adv, c, amax, cap):
    """The decoupled objective element by element, in float64 Python."""
    total, grads = 0.0, []
    n = len(lp)
    for x, p, b, a in zip(lp, prox, behav, adv):
        a = min(max(a, -amax), amax)
        r = math.exp(x - p)
        w = min(math.exp(p - b), cap)
        rc = min(max(r, 1 - c), 1 + c)
        unclipped, clipped = -a * r, -a * rc
        total += w * max(unclipped, clipped)
        # d/dx: the unclipped term carries the gradient where it is the larger one
        grads.append(w * -a * r / n if unclipped >= clipped else 0.0)
    return total / n, grads


@pytest.mark.parametrize("seed", [4, 5])
def test_decoupled_ppo_loss_against_loop(seed):
    from armature.losses import decoupled_ppo_loss

    rng = np.random.default_rng(seed)
    behav = rng.normal(size=40)
    prox = behav + rng.normal(scale=0.5, size=40)  # the learner moved on since sampling
    lp = prox + rng.normal(scale=0.2, size=40)
    adv = rng.normal(scale=2.0, size=40)
    lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    loss, info = decoupled_ppo_loss(
        lp_t, torch.tensor(prox), torch.tensor(behav), torch.tensor(adv), 0.1, 3.0, weight_cap=2.0
    )
    expected, grads = hand_decoupled(lp, prox, behav, adv, 0.1, 3.0, 2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    weights = np.minimum(np.exp(prox - behav), 2.0)
    assert info["behaviour_weight"].item() == pytest.approx(weights.mean(), rel=1e-12)
    assert 0 < info["behaviour_capped"].item() == pytest.approx(np.mean(np.exp(prox - behav) > 2.0))
    assert info["clipfrac"].item() == pytest.approx(np.mean(np.abs(np.exp(lp - prox) - 1) > 0.1))
    loss.backward()
    np.testing.assert_allclose(lp_t.grad.numpy(), grads, atol=1e-12, rtol=1e-9)


def test_decoupled_ppo_loss_is_ddpo_loss_when_the_samples_are_fresh():
    from armature.losses import decoupled_ppo_loss

    old = torch.tensor(OLD, dtype=torch.float64)
    lp = torch.tensor(LP, dtype=torch.float64)
    adv = torch.tensor(ADVS, dtype=torch.float64)
    loss, info = decoupled_ppo_loss(lp, old, old, adv, 0.2, 2.0, weight_cap=5.0)
    expected, kl, clipfrac = hand_ddpo(LP, OLD, ADVS, 0.2, 2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert info["clipfrac"].item() == pytest.approx(clipfrac) and info["behaviour_weight"].item() == 1.0
    with pytest.raises(ValueError, match="weight_cap"):
        decoupled_ppo_loss(lp, old, old, adv, 0.2, 2.0, weight_cap=0.0)


def test_k3_kl_is_unbiased_for_two_gaussians_and_zero_against_itself():
    """Samples of N(0.3, 1) scored under N(0.3, 1) and N(0, 1): the k3 average approaches the
    closed form KL = (0.3 - 0)^2 / 2 = 0.045; each term is exp(d) - d - 1 >= 0."""
    from armature.losses import k3_kl

    torch.manual_seed(0)
    p, q = torch.distributions.Normal(0.3, 1.0), torch.distributions.Normal(0.0, 1.0)
    x = p.sample((400_000,))
    log_p, log_q = p.log_prob(x), q.log_prob(x)
    assert abs(k3_kl(log_p, log_q).item() - 0.045) < 2e-3
    d = (log_q - log_p)[:5].double().numpy()
    np.testing.assert_allclose(k3_kl(log_p[:5].double(), log_q[:5].double()).item(), np.mean(np.exp(d) - d - 1))
    assert k3_kl(log_p, log_p).item() == 0.0
