"""What the model saw and what it could have said: per-token probabilities and the sampler's filters.

``score_text`` gives each token of a text its probability under a model, its rank among all tokens
and the most likely alternatives. ``next_token`` shows the distribution of the token after the text
at each step of the sampler (repetition penalty, temperature, top-k, top-p): the tokens each step
removes and the probabilities left. Those steps are ``sampling.filter_stages``, the very function the
sampler draws from, so what this view shows is what ``sample`` would do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from gptchat.core.errors import UsageError
from gptchat.core.generate import sampling
from gptchat.core.generate.sampling import SamplingParams
from gptchat.core.text.tokenizer import Tokenizer

EOT = 50256  # GPT-2 has no BOS token; <|endoftext|> before the text lets its first token be scored too


@dataclass
class Alternative:
    id: int
    text: str
    prob: float


@dataclass
class TokenScore:
    """One token of the text: how likely the model found it given everything before it."""
    index: int
    id: int
    text: str
    prob: float
    logprob: float
    rank: int  # 1 = the model's first choice
    top: list[Alternative] = field(default_factory=list)


@dataclass
class Stage:
    """The distribution after one step of the sampler."""
    name: str
    kept: int  # tokens with probability > 0 after this step
    removed: list[Alternative]  # the most likely tokens this step removed (probability before it)
    removed_count: int
    removed_mass: float  # probability (before this step) of everything it removed
    top: list[Alternative]


@dataclass
class NextToken:
    params: dict
    stages: list[Stage]

    @property
    def final(self) -> list[Alternative]:
        return self.stages[-1].top


def _text(tok: Tokenizer, i: int) -> str:
    return tok.decode([i])


def window(ids: list[int], n_ctx: int) -> list[int]:
    """The last tokens that fit the window, <|endoftext|> first when it fits too."""
    if not ids:
        raise UsageError("nothing to inspect: the text has no tokens")
    ids = [EOT] + list(ids)
    return ids[-n_ctx:]


def score_text(logits: torch.Tensor, ids: list[int], tok: Tokenizer, top: int = 5) -> list[TokenScore]:
    """Score ids[1:] with logits (T, V) from ``Engine.logits(ids)``: row t predicts ids[t + 1]."""
    logp = torch.log_softmax(logits[:-1], dim=-1)  # (T-1, V)
    target = torch.tensor(ids[1:], device=logp.device)[:, None]
    chosen = logp.gather(1, target)  # (T-1, 1)
    ranks = (logp > chosen).sum(-1) + 1  # ties count in the token's favour
    top_lp, top_ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    out = []
    for t in range(len(ids) - 1):
        lp = float(chosen[t])
        alts = [Alternative(int(i), _text(tok, int(i)), math.exp(float(v))) for v, i in zip(top_lp[t], top_ids[t])]
        out.append(TokenScore(t, ids[t + 1], _text(tok, ids[t + 1]), math.exp(lp), lp, int(ranks[t]), alts))
    return out


def next_token(last_logits: torch.Tensor, ids: list[int], params: SamplingParams, tok: Tokenizer,
               top: int = 10) -> NextToken:
    """The next token's distribution (``last_logits``: (V,)) at each step of the sampler.

    ``ids``: the context, which the repetition penalty reads (as the engine does, every token in it).
    """
    logits = last_logits.float()[None]  # (1, V)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, torch.tensor([i for i in ids if i < logits.shape[-1]], dtype=torch.long)] = True
    stages = sampling.filter_stages(logits, params, seen)
    # the last step's distribution is the sampler's own (filtered_probs is what sample draws from)
    dists = [torch.softmax(x, dim=-1)[0] for _, x in stages[:-1]] + [sampling.filtered_probs(logits, params, seen)[0]]
    out, prev = [], None
    for (name, _), probs in zip(stages, dists):
        out.append(_stage(name, probs, prev, tok, top))
        prev = probs
    return NextToken(params.to_dict(), out)


def _stage(name: str, probs: torch.Tensor, prev: torch.Tensor | None, tok: Tokenizer, top: int) -> Stage:
    k = min(top, probs.shape[-1])
    p, i = probs.topk(k)
    alts = [Alternative(int(a), _text(tok, int(a)), float(b)) for b, a in zip(p, i) if b > 0]
    kept = int((probs > 0).sum())
    if prev is None:
        return Stage(name, kept, [], 0, 0.0, alts)
    gone = (probs == 0) & (prev > 0)
    gp = torch.where(gone, prev, torch.zeros_like(prev))
    gk = min(top, int(gone.sum()))
    rp, ri = gp.topk(gk) if gk else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    removed = [Alternative(int(a), _text(tok, int(a)), float(b)) for b, a in zip(rp, ri)]
    return Stage(name, kept, removed, int(gone.sum()), float(gp.sum()), alts)


def inspect_model(lm, text_ids: list[int], params: SamplingParams, top: int = 5, score_from: int = 0) -> dict:
    """Everything ``gptchat inspect`` shows for one loaded model (``core.generate.loaded.LoadedModel``).

    ``score_from``: report only tokens from this index of ``text_ids`` on (a reply after its prompt);
    the tokens before it are still the context the later ones are scored in.
    """
    e = lm.engine
    ids = window(text_ids, e.n_ctx)
    logits = e.logits(ids)
    offset = len(text_ids) - (len(ids) - 1)  # text tokens that fell out of the window
    tokens = [t for t in score_text(logits, ids, lm.tokenizer, top) if t.index + offset >= score_from]
    nxt = next_token(logits[-1], ids[1:] if ids[0] == EOT else ids, params, lm.tokenizer, max(top, 10))
    lps = [t.logprob for t in tokens]
    return {
        "model": lm.name,
        "tokens": [asdict(t) for t in tokens],
        "dropped_tokens": len(text_ids) + 1 - len(ids),
        "mean_logprob": sum(lps) / len(lps) if lps else None,
        "perplexity": math.exp(-sum(lps) / len(lps)) if lps else None,
        "next": {"params": nxt.params, "stages": [asdict(s) for s in nxt.stages]},
    }
