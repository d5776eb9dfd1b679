"""Sampling functions: the greedy limits, filtering, seeds, and validation."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.generate.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    sample,
    top_k_filter,
    top_p_filter,
)


def _logits(B=4, V=1000, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0), SamplingParams(top_p=0), SamplingParams(top_k=1), SamplingParams(greedy=True),
    SamplingParams(temperature=0, top_k=50, top_p=0.5),
])
def test_greedy_limits_give_argmax(params):
    logits = _logits()
    gens = [make_generator(i) for i in range(4)]
    assert params.is_greedy
    assert torch.equal(sample(logits, params, gens), logits.argmax(-1))


def test_tiny_top_p_is_greedy_even_when_sampling():
    logits = _logits()
    out = sample(logits, SamplingParams(temperature=1.5, top_p=1e-6), [make_generator(i) for i in range(4)])
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_keeps_exactly_k():
    logits = _logits()
    kept = torch.isfinite(top_k_filter(logits, 7))
    assert kept.sum(-1).tolist() == [7] * 4
    top7 = logits.topk(7, dim=-1).indices
    assert kept.gather(1, top7).all()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5+0.3 >= 0.7
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_samples_only_from_the_filtered_set():
    logits = _logits(B=1, V=50)
    params = SamplingParams(temperature=2.0, top_k=3)
    allowed = set(logits.topk(3, dim=-1).indices[0].tolist())
    gen = make_generator(1)
    seen = {int(sample(logits, params, [gen])) for _ in range(300)}
    assert seen == allowed  # all three drawn at temperature 2, nothing else


def test_same_seed_same_tokens_different_seed_differs():
    logits = _logits(B=1, V=5000)
    params = SamplingParams(temperature=1.0)

    def draw(seed):
        g = make_generator(seed)
        return [int(sample(logits, params, [g])) for _ in range(20)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def test_rows_do_not_depend_on_their_neighbours():
    logits = _logits(B=3, V=5000)
    params = SamplingParams(temperature=1.0)
    alone = sample(logits[1:2], params, [make_generator(9)])
    together = sample(logits, params, [make_generator(1), make_generator(9), make_generator(3)])
    assert int(alone) == int(together[1])


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    # a strong penalty moves greedy off a token already seen
    assert int(sample(logits, SamplingParams(greedy=True, repetition_penalty=3.0), seen=seen)) == 2


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=1.5), dict(top_p=-0.1), dict(repetition_penalty=0),
    dict(repetition_penalty=-1.0),
])
def test_bad_values_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_filters_validate_too():
    with pytest.raises(ValueError):
        top_k_filter(_logits(), -3)
    with pytest.raises(ValueError):
        top_p_filter(_logits(), 2.0)


def _frequencies(logits, params, draws, seed=5):
    g = make_generator(seed)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws):
        counts[int(sample(logits, params, [g]))] += 1
    return counts / draws


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.3, top_k=6), SamplingParams(temperature=0.7, top_k=6, top_p=0.8),
    SamplingParams(temperature=1.5), SamplingParams(temperature=1.0, top_p=0.9)
])
def test_draws_follow_the_filtered_distribution(params):
    """The sampler draws from filtered_probs (what `gptchat inspect` shows), whichever path it takes."""
    from gptchat.core.generate.sampling import filtered_probs
    logits = _logits(B=1, V=12, seed=3)
    want = filtered_probs(logits, params)[0]
    got = _frequencies(logits, params, 6000)
    assert got[want == 0].sum() == 0  # nothing outside the kept set
    assert (got - want).abs().sum() / 2 < 0.03  # total variation: ~0.01-0.02 expected from 6000 draws


def test_top_k_rows_walk_the_same_order_as_the_whole_row():
    """The top-k and top-p shortcuts pick, for the same random number, the token the whole filtered row would."""
    from gptchat.core.generate import sampling
    logits = _logits(B=3, V=3000, seed=4)
    from gptchat.core.generate.sampling import _top_p_probs

    small, wide = SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=2.0, top_p=0.95)
    assert _top_p_probs(logits, small) is not None and _top_p_probs(logits, wide) is None  # both ways are walked
    for params in (SamplingParams(temperature=0.8, top_k=40), SamplingParams(temperature=1.1, top_k=25, top_p=0.7),
                   small, wide):
        for seed in range(40):
            gens = [make_generator(seed * 3 + i) for i in range(3)]
            fast = sample(logits, params, gens)
            u = torch.cat([torch.rand(1, generator=make_generator(seed * 3 + i), dtype=torch.float64) for i in range(3)])
            whole = sampling._draw(sampling.filtered_probs(logits, params), u)
            assert torch.equal(fast, whole)


def test_ties_at_the_kth_value_stay_in():
    logits = torch.full((1, 30), -5.0)
    logits[0, [4, 9, 17]] = 2.0  # three tokens tie for the two places of top_k=2: top_k_filter keeps all three
    seen = set(torch.nonzero(_frequencies(logits, SamplingParams(temperature=1.0, top_k=2), 300) > 0)[:, 0].tolist())
    assert seen == {4, 9, 17}


def test_the_last_uniform_never_reaches_a_dropped_token():
    from gptchat.core.generate.sampling import _draw
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]])
    for u, want in ((0.0, 1), (0.2499, 1), (0.25, 3), (1 - 2.0 ** -53, 3)):
        assert int(_draw(probs, torch.tensor([u], dtype=torch.float64))) == want


def test_a_tie_across_the_nucleus_edge_goes_to_the_whole_row():
    from gptchat.core.generate.sampling import _top_p_probs

    logits = torch.full((1, 300), -10.0)
    logits[0, [7, 50, 120, 200]] = torch.tensor([5.0, 3.0, 3.0, 3.0])  # masses ~0.71, then three of ~0.10
    assert _top_p_probs(logits, SamplingParams(top_p=0.75)) is None  # the edge falls between two tied tokens
    assert _top_p_probs(logits, SamplingParams(top_p=0.5)) is not None  # only the first kept: no tie at the edge


def test_greedy_of_16_bit_logits_is_their_own_argmax_ties_included():
    from gptchat.core.generate.sampling import greedy

    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    x[2, 10] = x[2, 700] = x[2].max() + 1  # a tie: the first index wins, as PyTorch's argmax gives
    for dt in (torch.bfloat16, torch.float16):
        lg = x.to(dt)
        assert torch.equal(greedy(lg), lg.argmax(dim=-1))
    assert greedy(x.bfloat16())[2] == 10


@pytest.mark.skipif(__import__("gptchat.core.model.native", fromlist=["kernel"]).kernel() is None,
                    reason="the C kernels cannot be built here")
def test_the_c_argmax_is_torchs_ties_nans_and_infinities_included():
    from gptchat.core.generate.sampling import greedy
    from gptchat.core.model import picks

    g = torch.Generator().manual_seed(13)
    for V in (1, 5, 8, 9, 17, 1000, 50257):  # rows shorter than a vector, a tail past the vectors
        wide = torch.randn(12, V + 3, generator=g) * 3
        x = wide[:, :V]  # rows apart in memory, as the engine's logits[:, :vocab] are
        x[1] = float("-inf")  # every value -inf: the first
        x[2] = 4.0  # every value equal: the first
        x[3, V // 2 :] = x[3].max() + 1  # the best tied from the middle to the end: the middle
        x[4, V - 1] = float("nan")  # a NaN in the tail, then one earlier: the first NaN
        x[5, V // 3] = x[5, V - 1] = float("nan")
        x[6, V - 1] = float("inf")
        x[7, 0] = x[7].max() + 1  # at the very start
        x[8, -1] = x[8].max() + 1  # at the very end
        x[9, V // 2 :: 8] = x[9].max() + 2  # tied in one vector lane at several places, and in others
        x[10, :] = -0.0
        x[10, V // 2] = 0.0  # -0.0 and 0.0 are equal: the first
        for dt in (torch.float32, torch.bfloat16):
            lg = x.to(dt)
            got = picks.argmax(lg)
            assert got is not None and torch.equal(got, torch.argmax(lg, dim=-1)), (V, dt, got, torch.argmax(lg, -1))
            assert torch.equal(greedy(lg), got)
    assert picks.argmax(torch.randn(3, 10).half()) is None and picks.argmax(torch.randn(10, 3).t()) is None


@pytest.mark.skipif(__import__("gptchat.core.model.native", fromlist=["kernel"]).kernel() is None,
                    reason="the C kernels cannot be built here")
def test_the_c_top_k_draw_picks_the_whole_rows_token():
    """The kernel's top-k draw (one pass over each row) gives, for the same uniform, the token the whole filtered
    row gives; rows it cannot take (ties among the k + 1 best, NaN, infinities) come back -1 and sample() draws
    them from the whole row, leaving the other rows of the batch to the kernel."""
    from gptchat.core.generate import sampling
    from gptchat.core.model import picks

    g = torch.Generator().manual_seed(11)
    cases = [(50257, SamplingParams(temperature=0.8, top_k=40)), (3000, SamplingParams(temperature=1.3, top_k=256)),
             (1000, SamplingParams(temperature=0.5, top_k=7, top_p=0.6)), (9, SamplingParams(temperature=2.0, top_k=8)),
             (500, SamplingParams(temperature=1.0, top_k=3, top_p=0.02))]
    for V, params in cases:
        wide = torch.randn(6, V + 5, generator=g) * torch.tensor([0.1, 1.0, 3.0, 8.0, 30.0, 1.0])[:, None]
        x = wide[:, :V]  # rows apart in memory, as the engine's logits[:, :vocab] are
        if V - V // 2 > params.top_k + 1:
            x[5, : V // 2] = float("-inf")  # half the row out of reach
        assert picks.can_sample_top_k(x, params.top_k)
        for _ in range(20):
            u = torch.rand(6, dtype=torch.float64, generator=g)
            tok, left = picks.sample_top_k(x, params.top_k, params.temperature, params.top_p, u)
            assert left == 0
            assert torch.equal(tok, sampling._draw(sampling.filtered_probs(x, params), u)), (V, params)

    x = torch.randn(4, 100, generator=g)
    x[1, [3, 50]] = 9.0  # a tie for the best place
    x[2, 7] = float("nan")
    x[3, 8] = float("inf")
    params = SamplingParams(temperature=1.0, top_k=5)
    u = torch.rand(4, dtype=torch.float64, generator=g)
    tok, left = picks.sample_top_k(x, params.top_k, params.temperature, params.top_p, u)
    assert left == 3 and tok[1:].tolist() == [-1, -1, -1] and tok[0] >= 0
    # sample(): the tie's row from its whole row, the other by the kernel, each with its own generator's uniform
    u = torch.cat([torch.rand(1, generator=make_generator(s), dtype=torch.float64) for s in (4, 5)])
    got = sample(x[:2], params, [make_generator(4), make_generator(5)])
    assert torch.equal(got, sampling._draw(sampling.filtered_probs(x[:2], params), u))
    ties = {int(sample(x[1:2], params, [make_generator(s)])) for s in range(60)}
    assert {3, 50} <= ties  # both tied tokens are drawn
