"""Save and restore a run: what makes resume exact.

A checkpoint holds the model in HF format (adapters merged), gptchat.json with its provenance and,
for the ``last`` link, trainer.pt: the optimizer state, the GradScaler, the RNG states and the
counters (``Progress``). runs.write_checkpoint makes it atomic (temp folder, fsync, DONE, rename,
then the links move). Restoring puts every one of those back, so a resumed run's losses equal those
of a run that never stopped; the batch order and learning rate are pure functions of the step.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from gptchat.core.errors import TrainError
from gptchat.core.train import lora, runs
from gptchat.core.train.context import Progress, Run, Trainee
from gptchat.core.train.dist import full_state, load_full_state
from gptchat.core.weights.checkpoints import save_hf
from gptchat.core.weights.readers import torch_load


def load_trainer(run: Run) -> tuple[Path | None, dict | None]:
    """(the ``last`` checkpoint folder, its trainer.pt) when resuming; (None, None) for a new run."""
    if not run.resuming:
        return None, None
    last_dir = runs.link_target(run.folder, "last")
    if last_dir is None:
        raise TrainError(f"run {run.folder.name!r} has no finished checkpoint to resume from; start it again")
    return last_dir, torch_load(last_dir / "trainer.pt")


def restore_adapters(model, trainer: dict, last_dir: Path) -> None:
    """Put the saved LoRA adapters back (the base weights come from the base model, as at the start)."""
    missing = set(lora.adapter_state(model)) - set(trainer["adapters"])
    if missing:
        raise TrainError(f"{last_dir}: the checkpoint lacks adapter {sorted(missing)[0]}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trainer["adapters"]:
                p.copy_(trainer["adapters"][n])


def restore(run: Run, t: Trainee, trainer: dict | None) -> Progress:
    """The optimizer, scaler, counters and RNG states of a resumed run; a new run seeds its RNGs."""
    dist = run.dist
    if trainer is None:
        torch.manual_seed(run.s.seed + dist.rank)
        random.seed(run.s.seed + dist.rank)
        return Progress()
    # the weights came with the model (loaded before wrapping); the optimizer state follows them
    load_full_state(t.raw, t.opt, None, trainer["optimizer"], run.s.fsdp, dist)
    if trainer.get("scaler"):
        t.scaler.load_state_dict(trainer["scaler"])
    rng = trainer["rng"]
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    random.setstate(_py_state(rng["python"]))
    return Progress(step=trainer["step"], best_val_loss=trainer["best_val_loss"], bad_evals=trainer["bad_evals"],
                    tokens_seen=trainer["tokens_seen"], elapsed=trainer["elapsed"], saved_step=trainer["step"])


def save(run: Run, t: Trainee, p: Progress, links: list[str], metrics: dict) -> None:
    """Write the checkpoint for step ``p.step`` and point ``links`` (last, best) at it; every rank calls this."""
    if "last" in links:
        p.saved_step, p.t_saved = p.step, time.monotonic()
    dist = run.dist
    msd, osd = full_state(t.raw, t.opt, run.s.fsdp, dist) if (run.s.fsdp or dist.main) else (None, None)
    if not dist.main:
        dist.barrier()
        return
    state = _trainer_state(run, t, p, osd, msd)
    prov = _provenance(run, p, links, metrics)

    def write(tmp: Path):
        save_hf(lora.plain_model(t.raw, msd), tmp, run.tok_dir, prov)  # adapters merged; msd is gathered under FSDP
        if "last" in links:
            torch.save(state, tmp / "trainer.pt")

    path = runs.write_checkpoint(run.folder, p.step, write, links)
    for link in links:
        run.log.emit("checkpoint", step=p.step, kind=link, path=str(run.folder / link), target=str(path))
    dist.barrier()


def _trainer_state(run: Run, t: Trainee, p: Progress, osd, msd) -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    state = {"step": p.step, "optimizer": osd, "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
             "rng": rng, "best_val_loss": p.best_val_loss, "bad_evals": p.bad_evals, "tokens_seen": p.tokens_seen,
             "elapsed": p.elapsed_now()}
    if run.s.lora:
        state["adapters"] = lora.adapter_state(t.raw, msd)  # msd: under FSDP the parameters are shards
    return state


def _provenance(run: Run, p: Progress, links: list[str], metrics: dict) -> dict:
    """gptchat.json: where the weights came from, how they were trained, how good they are."""
    s, ds = run.s, run.ds
    return {
        "format": "gptchat-finetune", "version": 1, "run": run.folder.name, "step": p.step, "links": links,
        "base_model": None if s.from_scratch else (s.model or "gpt2"), "from_scratch": s.from_scratch,
        "arch": (s.arch or "tiny") if s.from_scratch else None,
        "data": {"key": ds.key, "files": ds.meta["files"], "n_tokens": ds.n_tokens, "format": s.format, "template": s.template},
        "settings": s.to_dict(), "resolved": run.r.to_dict(), "tokenizer": run.tok.source,
        "lora": {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": s.lora_targets, "merged": True} if s.lora else None,
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def ppl(v: float | None) -> float | None:
    return math.exp(min(v, 50)) if v is not None and math.isfinite(v) else None


def _py_state(st):
    # torch.load turns the tuple inside random.getstate() into a list; random.setstate needs tuples
    return (st[0], tuple(st[1]), st[2])
