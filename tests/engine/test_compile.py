"""The static-shape decode step (GPT.decode_step) and --compile: the same tokens as the eager loop."""

from __future__ import annotations

import pytest
import torch

from gptchat.core.generate.engine import Engine
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.model.device import compile_default, compile_mode
from tests.factory import hf_model, save

GREEDY = SamplingParams(greedy=True)
PROMPTS = ([3, 1, 4, 1, 5], [9] * 20, [7])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save(hf_model(n_layer=2, n_head=4, n_embd=64, n_positions=64, seed=5), tmp_path_factory.mktemp("c")))


def _tokens(engine, prompt, n, params=GREEDY):
    return [step[0].token for step in engine.generate([prompt], params, n, ignore_eos=True)]


def test_static_step_matches_the_eager_loop(folder):
    """decode_step uncompiled (whole cache, mask, tensor slot) gives the dynamic loop's tokens and logits."""
    eager = Engine.load(folder, device="cpu", compile=False)
    static = Engine.load(folder, device="cpu", compile=True)
    static._step = static.model.decode_step  # the step itself, without torch.compile: fast
    for prompt in PROMPTS:
        assert _tokens(static, prompt, 30) == _tokens(eager, prompt, 30)
    # sampled rows follow the same logits through the same generator
    params = SamplingParams(temperature=1.3, top_k=20)
    assert _tokens(static, [2, 2], 25, params) == _tokens(eager, [2, 2], 25, params)
    # the step's logits against a full recomputation of the sequence
    ids = PROMPTS[0] + _tokens(eager, PROMPTS[0], 6)
    with torch.inference_mode():
        m = static.model
        m.setup_cache(1, static.n_ctx)
        m(torch.tensor([ids[:-1]]), start=0, kv_len=len(ids) - 1)
        got = m.decode_step(torch.tensor([[ids[-1]]]), torch.tensor(len(ids) - 1))
        m.drop_cache()
        want = m(torch.tensor([ids]))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_greedy_equals_eager(folder):
    eager = Engine.load(folder, device="cpu", compile=False)
    comp = Engine.load(folder, device="cpu", compile=True)
    assert comp.warm_up() > 0 and comp.compile_s > 0
    for prompt in PROMPTS:
        assert _tokens(comp, prompt, 40) == _tokens(eager, prompt, 40)
    # one graph for every reply: a single prompt always gets the n_ctx cache
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_defaults():
    assert compile_mode(torch.device("cuda")) == "reduce-overhead"
    assert compile_mode(torch.device("cpu")) == "default"
    assert compile_default(torch.device("cpu")) is False  # measured slower on CPU: off unless asked
    borrowed = Engine(hf_model_gpt(), borrowed=True, compile=True)
    assert borrowed.compile is False  # a training run's model is never compiled


def hf_model_gpt():
    from gptchat.core.model.config import GPTConfig
    from gptchat.core.model.gpt import GPT

    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50))
    m.init_weights(0)
    return m
