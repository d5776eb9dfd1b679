"""Sampling as small pure functions over a (B, V) logits tensor.

Every function validates its arguments and raises ``ValueError`` on bad values. Temperature 0,
top_p 0 and top_k 1 all reduce to greedy decoding; ``sample`` treats them as argmax explicitly so the
result does not depend on a random number generator at all.
"""

from __future__ import annotations

import torch

from gptchat.core.generate.options import SamplingParams, check
from gptchat.core.model import picks

__all__ = ["SamplingParams", "apply_repetition_penalty", "apply_temperature", "top_k_filter", "top_p_filter", "greedy",
           "filter_stages", "filtered_probs", "sample", "make_generator"]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen (seen: (B, V) bool) less likely: positive logits / penalty, negative * penalty."""
    check("repetition_penalty", penalty)
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    check("temperature", temperature)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding; call greedy() instead of scaling by 1/0")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits in each row (ties at the k-th value are kept too)."""
    check("top_k", k)
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches p (at least one)."""
    check("top_p", p)
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop_sorted = _outside_nucleus(torch.softmax(sorted_logits.float(), dim=-1), p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row: CPU rows of fp32 or bf16 in the C kernel (picks.argmax: the index torch.argmax
    gives; 16 x 50257 fp32 logits 0.75 -> 0.22 ms on a 2-core Xeon, 1.27 ms inside a batch-16 generation); other
    16-bit CPU logits are widened first (exact; the same index): PyTorch's CPU argmax of 16 x 50257 bf16 logits
    took 1.5 ms against 0.64 ms with the widening, 6% of a bf16 batch-16 decode step on a 2-core Zen 4."""
    picked = picks.argmax(logits)
    if picked is not None:
        return picked
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return torch.argmax(logits, dim=-1)


def filter_stages(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> list[tuple[str, torch.Tensor]]:
    """The logits (B, V) after each step of the sampler, in order: ``[("logits", ...), ...]``.

    The steps are repetition penalty (when ``seen`` is given and the penalty is on), then either
    greedy (every token but the argmax set to -inf) or temperature, top-k and top-p. Steps that are
    off are left out. ``gptchat inspect`` shows these; ``sample`` draws from the last one.
    """
    logits = logits.float()
    stages = [("logits", logits)]
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        stages.append(("repetition_penalty", logits))
    if params.is_greedy:
        best = greedy(logits)[..., None]  # (B, 1)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, best, True)
        stages.append(("greedy", logits.masked_fill(~keep, float("-inf"))))
        return stages
    logits = apply_temperature(logits, params.temperature)
    if params.temperature != 1.0:
        stages.append(("temperature", logits))
    for name, on, step in (("top_k", params.top_k > 0, lambda x: top_k_filter(x, params.top_k)),
                           ("top_p", params.top_p < 1.0, lambda x: top_p_filter(x, params.top_p))):
        if on:
            logits = step(logits)
            stages.append((name, logits))
    return stages


def filtered_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, V) that ``sample`` draws from: softmax of the last filter stage."""
    return torch.softmax(filter_stages(logits, params, seen)[-1][1], dim=-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), drawn from ``filtered_probs``.

    Each row draws from its own generator, so a row's tokens depend on its seed alone, never on
    which other rows share the batch. Greedy settings take the argmax without touching a generator.

    The draw is one uniform number per row, mapped through the cumulative distribution of the kept
    tokens in vocabulary order (float64). Why not ``torch.multinomial``: for one sample it draws an
    exponential number for every entry of the row (50257 for GPT-2) and took 1.5-1.8 ms a row on this
    project's CPU, a quarter of an int8 batch-1 token and a third of a batch-16 step; this takes
    0.02-0.3 ms. With top-k on, only the k best logits are normalised and walked (same distribution,
    same token for the same uniform as the whole row would give), on the CPU by the C kernel in one pass
    over each row (``_native_top_k``); the whole row is used instead when it has ties among them, so that
    ties at the k-th value stay in as ``top_k_filter`` keeps them.
    Top-p alone looks for the nucleus among the most likely few hundred or thousand tokens the same way.
    """
    if params.is_greedy:  # the last stage keeps only the argmax: no softmax, no generator
        return greedy(_penalised(logits, params, seen))
    u = _uniforms(logits.shape[0], generators, logits.device)
    best = None
    if 0 < params.top_k < logits.shape[-1]:
        penalised = _penalised(logits, params, seen)
        if picks.can_sample_top_k(penalised, params.top_k) and u.device.type == "cpu":
            return _native_top_k(penalised, params, u)
        best = _top_k_probs(penalised, params)
    elif params.top_p < 1.0:
        best = _top_p_probs(_penalised(logits, params, seen), params)
    if best is not None:
        probs, idx = best
        return idx.gather(-1, _draw(probs, u)[:, None]).squeeze(-1)
    return _draw(filtered_probs(logits, params, seen), u)


def _native_top_k(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """Top-k draws in the C kernel (picks.sample_top_k): the same walk as ``_top_k_probs`` and ``_draw``, in one
    pass over each row (PyTorch's topk alone took ~90 us of the ~175 us a 124M row's draw took, ~15 us here).
    A row it leaves (a tie among its k + 1 best, a NaN or an infinity) is drawn from its whole filtered row."""
    tok, left = picks.sample_top_k(logits, params.top_k, params.temperature, params.top_p, u)
    for r in torch.nonzero(tok < 0)[:, 0].tolist() if left else ():
        tok[r] = _draw(filtered_probs(logits[r : r + 1], params), u[r : r + 1])[0]
    return tok


def _penalised(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    return logits


def _uniforms(n: int, generators: list[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, each from its row's generator."""
    dev = torch.device(device)
    if generators is None:  # float64 is not available on mps: the numbers are drawn and walked on the CPU there
        return torch.rand(n, dtype=torch.float64, device=dev if dev.type != "mps" else "cpu")
    if len(generators) != n:
        raise ValueError(f"need one generator per row: {len(generators)} for {n} rows")
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64,
                                 device=g.device if dev.type != "mps" else "cpu") for g in generators])


def _top_k_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The k best tokens of each row in vocabulary order and their (unnormalised) probabilities after
    temperature and top-p, or None when ties among them make the whole row's filters necessary."""
    k, V = params.top_k, logits.shape[-1]
    vals, idx = torch.topk(logits, min(k + 1, V), dim=-1)  # descending
    if bool((vals[:, 1:] == vals[:, :-1]).any()):  # a tie could straddle the k-th place or top-p's edge
        return None
    vals, idx = vals[:, :k], idx[:, :k]
    probs = torch.softmax(apply_temperature(vals, params.temperature), dim=-1)
    if params.top_p < 1.0:
        probs = probs.masked_fill(_outside_nucleus(probs, params.top_p), 0.0)
    return _vocabulary_order(probs, idx)


def _top_p_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-p without top-k: the nucleus found among the 256 (else 4096) most likely tokens, normalised over
    the whole row, in vocabulary order; None when it reaches past them or a tie sits at its edge (then
    ``top_p_filter`` sorts the whole row: 5 ms a row of 50257 where this takes ~0.3)."""
    scaled = apply_temperature(logits, params.temperature)
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    for m in (256, 4096):
        if m >= scaled.shape[-1]:
            return None
        vals, idx = torch.topk(scaled, m, dim=-1)  # descending
        probs = torch.exp(vals - lse)
        drop = _outside_nucleus(probs, params.top_p)
        if not bool(drop[:, -1].all()):
            continue  # some row's nucleus may go on past these m
        kept = (~drop).sum(dim=-1, keepdim=True)  # the nucleus is the first `kept` of each row
        if bool((vals.gather(-1, kept - 1) == vals.gather(-1, kept)).any()):
            return None  # a tie across the edge: which of the tied tokens stays is the full sort's call
        return _vocabulary_order(probs.masked_fill(drop, 0.0), idx)
    return None


def _outside_nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    """For probabilities sorted high to low: True past the nucleus, the tokens whose mass ranked above them
    exceeds p (the most likely token always stays, so top_p 0 is greedy). top_p_filter and the shortcuts."""
    drop = torch.cumsum(probs, dim=-1) - probs > p
    drop[..., 0] = False
    return drop


def _vocabulary_order(probs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (probabilities, token ids) re-ordered by token id, the order the whole-row draw walks."""
    order = idx.argsort(dim=-1)
    return probs.gather(-1, order), idx.gather(-1, order)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row the first index whose cumulative mass passes u x the total.
    Entries of zero mass are never returned (their cumulative mass equals the one before them)."""
    device = probs.device
    if u.device != device:
        probs = probs.to(u.device)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    pick = torch.searchsorted(cdf, u[:, None] * total, right=True)
    last = torch.searchsorted(cdf, total)  # the last entry with mass: u x total may round up to the total
    return torch.minimum(pick, last).squeeze(-1).to(device)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    device = torch.device(device)
    # mps generators exist only in recent torch; sampling on the CPU is cheap at (1, V)
    gen = torch.Generator(device=device if device.type in ("cpu", "cuda") else "cpu")
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen
