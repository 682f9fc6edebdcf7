"""rlhf_kernels.ranked_reward_loss: hand-computed K = 3 cases with a tie and an absent slot, Plackett-Luce against a
brute force over permutations, the loop reference (values and gradients, fp64), margins, centring, the normalizer,
the statistics (pairwise accuracy, Kendall tau) and the argument checks."""

import itertools
import math

import pytest
import torch
from conftest import DEVICE

import rlhf_kernels
from rlhf_kernels import reference


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def ranks_t(x):
    return torch.tensor(x, dtype=torch.int64, device=DEVICE)


# Prompt 1: rewards (2, 1, 1), ranks (0, 1, 1): responses 1 and 2 tie, so the pairs are (0, 1) and (0, 2), each with
#   r_w - r_l = 1: loss = (-log sigmoid(1)) * 2 / 2 = log(1 + e^-1) = 0.3132617.
# Prompt 2: rewards (0, 1, 3), ranks (0, 1, 2): pairs (0, 1), (0, 2), (1, 2) with r_w - r_l = -1, -3, -2:
#   loss = (1.3132617 + 3.0485874 + 2.1269280) / 3 = 2.1629257.
# Batch loss: (0.3132617 + 2.1629257) / 2 = 1.2380937.
HAND_REWARDS = [[2.0, 1.0, 1.0], [0.0, 1.0, 3.0]]
HAND_RANKS = [[0, 1, 1], [0, 1, 2]]


def test_pairwise_hand_computed_with_a_tie():
    rewards = t(HAND_REWARDS).requires_grad_()
    loss, stats = rlhf_kernels.ranked_reward_loss(rewards, ranks_t(HAND_RANKS))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(1.2380936854482676, abs=1e-12)
    loss.backward()
    # d(-log sigmoid(d))/dd = -sigmoid(-d), each pair weighted 1 / (n_p * P):
    # prompt 1: d/dr0 = -2 sigmoid(-1) / (2 * 2) = -0.1344707, d/dr1 = d/dr2 = sigmoid(-1) / 4 = 0.0672354
    # prompt 2: d/dr0 = -(sigmoid(1) + sigmoid(3)) / 6 = -0.2806055, d/dr1 = (sigmoid(1) - sigmoid(2)) / 6 =
    #   -0.0249564, d/dr2 = (sigmoid(3) + sigmoid(2)) / 6 = 0.3055619
    expected = [[-0.13447071068499755, 0.06723535534249878, 0.06723535534249878],
                [-0.28060545090873973, -0.02495641655797957, 0.30556186746671926]]  # fmt: skip
    torch.testing.assert_close(rewards.grad, t(expected), atol=1e-12, rtol=0)
    # accuracy: prompt 1 scores both pairs in order, prompt 2 none of its three: 2 / 5
    assert stats["accuracy"].item() == pytest.approx(0.4)
    # Kendall tau-b: prompt 1 agrees on both untied pairs and ties where the labels tie: +1; prompt 2 reverses: -1
    assert stats["kendall_tau"].item() == pytest.approx(0.0)
    assert int(stats["num_pairs"]) == 5 and int(stats["num_prompts"]) == 2 and int(stats["num_tau_prompts"]) == 2
    assert stats["reward/mean"].item() == pytest.approx(8 / 6)
    assert stats["reward/min"].item() == 0.0 and stats["reward/max"].item() == 3.0


def test_plackett_luce_hand_computed():
    # ranking 0 > 1 > 2 of rewards (0, 1, 3): [lse(0, 1, 3) - 0] + [lse(1, 3) - 1] + [lse(3) - 3] = 5.2967740
    # tie (0 > {1, 2}) of rewards (2, 1, 1): [lse(2, 1, 1) - 2] + 2 [lse(1, 1) - 1] = 0.5514447 + 2 log 2 = 1.9377391
    loss, _ = rlhf_kernels.ranked_reward_loss(t([[0.0, 1.0, 3.0]]), ranks_t([[0, 1, 2]]), mode="plackett_luce")
    assert loss.item() == pytest.approx(5.296774030599258, abs=1e-12)
    loss, _ = rlhf_kernels.ranked_reward_loss(t([[2.0, 1.0, 1.0]]), ranks_t([[0, 1, 1]]), mode="plackett_luce")
    assert loss.item() == pytest.approx(1.9377390750519412, abs=1e-12)


def brute_force_pl_probability(r: list[float], order: tuple[int, ...]) -> float:
    """P(order) as successive draws without replacement, each with probability exp(r_i) / sum of the rest."""
    prob, left = 1.0, list(range(len(r)))
    for i in order:
        prob *= math.exp(r[i]) / sum(math.exp(r[j]) for j in left)
        left.remove(i)
    return prob


def test_plackett_luce_matches_a_brute_force_over_permutations():
    r = [0.3, -1.2, 0.8]
    total = 0.0
    for order in itertools.permutations(range(3)):
        ranks = [0] * 3
        for position, k in enumerate(order):
            ranks[k] = position
        loss, _ = rlhf_kernels.ranked_reward_loss(t([r]), ranks_t([ranks]), mode="plackett_luce")
        prob = brute_force_pl_probability(r, order)
        assert loss.item() == pytest.approx(-math.log(prob), abs=1e-12)
        total += math.exp(-loss.item())
    assert total == pytest.approx(1.0, abs=1e-12)  # the six rankings' likelihoods form a distribution


def random_case(P, K, seed, ties=True, absent=True):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(P, K, generator=g, dtype=torch.float64)
    ranks = torch.randint(0, K, (P, K), generator=g)  # repeats: ties
    if not ties:
        ranks = torch.stack([torch.randperm(K, generator=g) for _ in range(P)])
    if absent:
        ranks[torch.rand(P, K, generator=g) < 0.2] = -1
    return rewards.to(DEVICE), ranks.to(DEVICE)


@pytest.mark.parametrize("mode", rlhf_kernels.RANK_LOSS_MODES)
@pytest.mark.parametrize("K", [2, 4, 7])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_matches_the_loop_reference(mode, K, center_coef):
    rewards, ranks = random_case(16, K, seed=K)
    x = rewards.clone().requires_grad_()
    loss, _ = rlhf_kernels.ranked_reward_loss(x, ranks, mode=mode, center_coef=center_coef)
    y = rewards.clone().requires_grad_()
    per_prompt = reference.ranked_reward_loss(y, ranks, mode=mode, center_coef=center_coef)
    has_pair = [any(0 <= int(a) < int(b) for a in row for b in row) for row in ranks.cpu()]
    assert sum(has_pair) >= 3  # the random case has prompts with and (often) without pairs
    expected = per_prompt.sum() / sum(has_pair)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", rlhf_kernels.RANK_LOSS_MODES)
def test_gradcheck(mode):
    rewards, ranks = random_case(4, 4, seed=3)
    torch.autograd.gradcheck(
        lambda r: rlhf_kernels.ranked_reward_loss(r, ranks, mode=mode, center_coef=0.1)[0],
        (rewards.requires_grad_(),),
    )


def test_margins_as_scores_or_per_pair():
    rewards, ranks = random_case(6, 4, seed=5, ties=False, absent=False)
    scores = torch.rand(6, 4, dtype=torch.float64, device=DEVICE)
    per_pair = scores[:, :, None] - scores[:, None, :]
    a, _ = rlhf_kernels.ranked_reward_loss(rewards, ranks, margins=scores)
    b, _ = rlhf_kernels.ranked_reward_loss(rewards, ranks, margins=per_pair)
    c = reference.ranked_reward_loss(rewards, ranks, margins=per_pair).mean()
    none, _ = rlhf_kernels.ranked_reward_loss(rewards, ranks)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)
    assert abs(a.item() - none.item()) > 1e-3


def test_k2_is_the_bradley_terry_pair_loss():
    # two responses ranked (0, 1): -log sigmoid(r_c - r_r - margin) + center_coef (r_c + r_r)^2, mean over pairs
    chosen, rejected, margin = t([0.5, -0.2, 1.0]), t([0.1, 0.4, 1.5]), t([0.0, 0.3, 0.1])
    rewards = torch.stack([chosen, rejected], 1)
    ranks = ranks_t([[0, 1]] * 3)
    margins = torch.stack([margin, torch.zeros_like(margin)], 1)
    loss, stats = rlhf_kernels.ranked_reward_loss(rewards, ranks, margins=margins, center_coef=0.05)
    expected = (-torch.nn.functional.logsigmoid(chosen - rejected - margin) + 0.05 * (chosen + rejected) ** 2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode", rlhf_kernels.RANK_LOSS_MODES)
def test_normalizer_splits_a_step_into_micro_batches(mode):
    rewards, ranks = random_case(10, 5, seed=11)
    full, _ = rlhf_kernels.ranked_reward_loss(rewards, ranks, mode=mode)
    count = int(rlhf_kernels.ranked_reward_loss(rewards, ranks, mode=mode)[1]["num_prompts"])
    parts = [
        rlhf_kernels.ranked_reward_loss(rewards[s], ranks[s], mode=mode, normalizer=count)[0]
        for s in (slice(0, 3), slice(3, 10))
    ]
    torch.testing.assert_close(sum(parts), full, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", rlhf_kernels.RANK_LOSS_MODES)
def test_absent_slots_take_no_part(mode):
    # an absent slot may hold any finite value (here 1e4): no effect on the loss, zero and finite gradient
    rewards = t([[0.5, 1e4, -0.5, 0.2]]).requires_grad_()
    ranks = ranks_t([[0, -1, 2, 1]])
    loss, stats = rlhf_kernels.ranked_reward_loss(rewards, ranks, mode=mode)
    compact, _ = rlhf_kernels.ranked_reward_loss(t([[0.5, -0.5, 0.2]]), ranks_t([[0, 2, 1]]), mode=mode)
    torch.testing.assert_close(loss, compact, atol=1e-12, rtol=0)
    loss.backward()
    assert rewards.grad[0, 1].item() == 0.0 and torch.isfinite(rewards.grad).all()
    assert stats["reward/max"].item() == 0.5  # over present responses only


@pytest.mark.parametrize("mode", rlhf_kernels.RANK_LOSS_MODES)
def test_prompts_without_pairs_add_nothing(mode):
    rewards = t([[1.0, 2.0], [0.3, -0.3], [5.0, 1.0]]).requires_grad_()
    ranks = ranks_t([[0, 0], [0, 1], [0, -1]])  # all tied; one pair; a single response
    loss, stats = rlhf_kernels.ranked_reward_loss(rewards, ranks, mode=mode)
    single, _ = rlhf_kernels.ranked_reward_loss(t([[0.3, -0.3]]), ranks_t([[0, 1]]), mode=mode)
    torch.testing.assert_close(loss, single, atol=1e-12, rtol=0)
    loss.backward()
    assert rewards.grad[0].abs().sum() == 0 and rewards.grad[2].abs().sum() == 0
    assert int(stats["num_prompts"]) == 1 and int(stats["num_tau_prompts"]) == 1
    nothing, _ = rlhf_kernels.ranked_reward_loss(t([[1.0, 2.0]]), ranks_t([[0, 0]]), mode=mode)
    assert nothing.item() == 0.0


def test_fp32_rewards_give_fp32_loss():
    rewards, ranks = random_case(5, 4, seed=2)
    loss32, _ = rlhf_kernels.ranked_reward_loss(rewards.float(), ranks)
    loss64, _ = rlhf_kernels.ranked_reward_loss(rewards, ranks)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, atol=1e-6, rtol=1e-6)


def test_kendall_tau_matches_its_definition():
    # tau-b for one prompt of 4: labels (0, 1, 1, 2), rewards (0.9, 0.1, 0.5, 0.5): pairs (i<j) label/model signs
    # (0,1) +/+ (0,2) +/+ (0,3) +/+ (1,2) 0/- (1,3) +/- (2,3) +/0: concordant 3, discordant 1;
    # untied label pairs 5, untied model pairs 5: tau-b = (3 - 1) / sqrt(5 * 5) = 0.4
    _, stats = rlhf_kernels.ranked_reward_loss(t([[0.9, 0.1, 0.5, 0.5]]), ranks_t([[0, 1, 1, 2]]))
    assert stats["kendall_tau"].item() == pytest.approx(0.4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mode": "listwise"}, ValueError, "unknown mode 'listwise'"),
        ({"ranks": [[0.0, 1.0]]}, TypeError, "ranks must be an integer tensor"),
        ({"ranks": [[0, 1, 2]]}, ValueError, "ranks shape"),
        ({"rewards": [1.0, 2.0]}, ValueError, r"rewards must be \(P, K\)"),
        ({"margins": [[0.0, 1.0]], "mode": "plackett_luce"}, ValueError, "margins apply to mode='pairwise'"),
        ({"margins": [[0.0, 1.0, 2.0]]}, ValueError, r"margins must be \(P, K\) scores"),
        ({"center_coef": -1.0}, ValueError, "center_coef must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"rewards": [[0.5, 0.1]], "ranks": [[0, 1]]}
    args.update(kwargs)
    rewards = t(args.pop("rewards"))
    raw = args.pop("ranks")
    ranks = t(raw) if isinstance(raw[0][0], float) else ranks_t(raw)
    if "margins" in args:
        args["margins"] = t(args["margins"])
    with pytest.raises(error, match=match):
        rlhf_kernels.ranked_reward_loss(rewards, ranks, **args)
