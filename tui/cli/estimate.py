"""`gptchat estimate`: memory, compute and time of a model before anything runs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gptchat.core.config import default_model
from gptchat.core.errors import UsageError
from gptchat.tui.cli.common import JsonOpt, err, print_json
from gptchat.tui.cli.table import print_table

EXAMPLES = """
\b
Examples:
  gptchat estimate gpt2-xl
  gptchat estimate gpt2 --train --data docs/ --block-size 1024 --batch-size 4
  gptchat estimate gpt2-xl --train --lora --grad-checkpointing --device a100
  gptchat estimate --params 7e9 --tokens 2e12
"""
TOKENIZE_LIMIT = 64 << 20  # above this many bytes of data, estimate tokens as bytes / 4 instead of tokenizing


def estimate(
    model: Annotated[Optional[str], typer.Argument(help="A hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), a preset (tiny, mini, nano), a checkpoint folder or a run name.", show_default=False)] = None,
    model_opt: Annotated[Optional[str], typer.Option("--model", "-m", help="The model, given as eval, generate and batch take it (the same as the argument).", show_default=False)] = None,
    params: Annotated[Optional[float], typer.Option("--params", help="A bare parameter count (7e9) instead of a model; no activations or KV cache then.")] = None,
    tokens: Annotated[Optional[float], typer.Option("--tokens", help="Training tokens for the compute estimate (2e12). Default: the --data's tokens, else the compute-optimal 20 per parameter.")] = None,
    train: Annotated[bool, typer.Option("--train", help="Show training memory: weights, gradients, Adam, activations.")] = False,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Training text (files or folders; repeatable): its tokens are counted.")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", min=1, help="Tokens per training sequence. Default: the model's window.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per micro-batch per device (and the KV cache's batch).")] = 1,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, or bf16/fp16 (mixed precision over fp32 master weights). Default: bf16 with a GPU --device, else fp32.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters only: the base is frozen.")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, help="LoRA rank.")] = 8,
    lora_targets: Annotated[str, typer.Option("--lora-targets", help="Comma list of q, k, v, o, fc, proj.")] = "q,k,v",
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Keep only block inputs; rebuild activations in backward.")] = False,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Devices: DDP per device, or FSDP sharded over them with --fsdp.")] = 1,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard weights, gradients and Adam over --gpus devices.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="Time on one device: a100, h100, h200, l4, t4 or cpu. Default: all.")] = None,
    utilisation: Annotated[float, typer.Option("--utilisation", min=0.01, max=1.0, help="The fraction of a GPU's peak a run reaches (0.4 is typical of tuned runs).")] = 0.4,
    measure: Annotated[bool, typer.Option("--measure/--no-measure", help="Measure this machine's CPU with a one-second matmul.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Estimate memory, compute and time for a GPT-2 model or a parameter count."""
    # the estimate module imports no torch; the CPU probe imports it only when it runs
    from gptchat.core.eval import estimate as est

    if model is not None and model_opt is not None and model != model_opt:
        raise UsageError(f"two models given ({model!r} and --model {model_opt!r}); give one")
    model = model if model is not None else model_opt
    if model is not None and params is not None:
        raise UsageError("give a model or --params, not both")
    if params is None:
        model = model or default_model()
    elif params < 1:
        raise UsageError(f"--params must be a positive count, got {params:g}")
    if device is not None and device != "cpu" and device not in est.DEVICES:
        raise UsageError(f"--device must be one of {', '.join(est.DEVICES)} or cpu, got {device!r}")
    precision = precision or ("bf16" if device not in (None, "cpu") else "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    cfg, name = _config(model) if model is not None else (None, f"--params {params:.3g}")
    n = cfg.n_params() if cfg is not None else int(params)
    block = min(block_size or (cfg.n_positions if cfg else 1024), cfg.n_positions if cfg else 1 << 30)
    doc = {"model": name, "config": cfg.to_dict() if cfg else None,
           "inference": est.inference_memory(cfg, n, batch_size)}
    if train:
        doc["training"] = _training(est, cfg, n, block, batch_size, precision, lora, lora_rank, lora_targets,
                                    grad_checkpointing, gpus, fsdp)
    n_tokens, source = _tokens(tokens, data, n, est)
    cpu = est.measure_cpu_flops(1.0) if measure and device in (None, "cpu") else None
    devices = [] if device == "cpu" else [device] if device else None
    doc["compute"] = {**est.compute_report(n, n_tokens, cfg, block, utilisation, devices, cpu, gpus,
                                                trainable=doc["training"]["trainable"] if train and lora else None), "tokens_source": source}
    if json_out:
        print_json(doc)
        return
    _print(doc)


def _config(spec: str):
    from gptchat.core.model.config import PRESETS

    if spec in PRESETS:
        return PRESETS[spec], spec
    from gptchat.core.weights.checkpoints import resolve  # reads config.json only, no weights

    ck = resolve(spec, download=False)
    return ck.config, ck.name


def _training(est, cfg, n, block, batch, precision, lora, rank, targets, gc, gpus, fsdp) -> dict:
    trainable = chosen = None
    if lora:
        if cfg is None:
            raise UsageError("--lora needs a model (its shape), not --params")
        try:
            chosen = [t.strip() for t in targets.split(",") if t.strip()]
            trainable = est.lora_params(cfg, rank, chosen)
        except ValueError as e:
            raise UsageError(f"--lora-targets: {e}") from None
    mixed = precision != "fp32"
    mem = est.training_memory(cfg, params=n, batch=batch, block=block, mixed=mixed, trainable=trainable,
                              frozen_bytes=2 if (lora and mixed) else 4, grad_checkpointing=gc,
                              ddp=gpus > 1 and not fsdp, fsdp_shards=gpus if fsdp else 1, lora_targets=chosen)
    return {**mem.to_dict(), "precision": precision, "batch": batch, "block": block, "gpus": gpus, "fsdp": fsdp,
            "bytes_per_param": mem.bytes_per_param}


def _tokens(tokens, data, n, est) -> tuple[int, str]:
    if tokens is not None:
        return int(tokens), "given"
    if data:
        from gptchat.core.text.tokenizer import gpt2_tokenizer
        from gptchat.core.train.data import collect_files, read_text

        files = collect_files(data)
        n_files = f"{len(files)} file{'s' if len(files) != 1 else ''}"
        size = sum(f.stat().st_size for f in files)
        if size > TOKENIZE_LIMIT:
            return size // 4, f"estimated as bytes / 4 ({size:,} bytes in {n_files})"
        tok = gpt2_tokenizer()
        return sum(len(tok.encode(read_text(f))) for f in files), f"counted with GPT-2's tokenizer ({n_files})"
    return est.compute_optimal_tokens(n), "compute-optimal (20 per parameter); give --tokens or --data"


def _gb(b: float) -> str:
    return f"{b / 1e9:,.2f} GB"


def _human_s(s: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:,.1f} {unit}"
    return f"{s:.1f} s"


def _print(doc: dict) -> None:
    inf = doc["inference"]
    err(f"{doc['model']}: {inf['params']:,} parameters (memory in GB = 10^9 bytes)")
    rows = [[f"weights {p}", _gb(b)] for p, b in inf["weights"].items()]
    rows += [[f"KV cache {p}, {inf['kv_tokens']} tokens x batch {inf['batch']}", _gb(b)]
             for p, b in inf.get("kv_cache", {}).items()]
    print_table(rows, ["inference", "memory"])
    if "training" in doc:
        t = doc["training"]
        mode = f"FSDP over {t['gpus']}" if t["fsdp"] else f"DDP, per device of {t['gpus']}" if t["gpus"] > 1 else "one device"
        print_table([
            ["weights (fp32 master; frozen base at its dtype)", _gb(t["weights"])],
            ["16-bit weight copies (autocast)", _gb(t["weight_copies"])],
            ["gradients", _gb(t["grads"])],
            ["Adam moments (2 x fp32)", _gb(t["adam"])],
            [f"activations (batch {t['batch']} x block {t['block']})", _gb(t["activations"])],
            ["DDP gradient buckets", _gb(t["ddp_buckets"])],
            [f"weights+grads+Adam per device: {t['bytes_per_param']:.1f} bytes per model parameter", ""],
            [f"peak per device ({t['precision']}, {mode})", _gb(t["total"])],
        ], ["training", "memory"])
    c = doc["compute"]
    print_table([
        ["tokens", f"{c['tokens']:.3g} ({c['tokens_source']})"],
        ["FLOPs per token", f"{c['flops_per_token']:.3g} (6 x params, 4 x frozen ones, + attention)"],
        ["training FLOPs", f"{c['flops']:.3g}"],
        ["petaflop/s-days", f"{c['petaflop_s_days']:.3g}"],
        ["compute-optimal tokens", f"{c['compute_optimal_tokens']:.3g} ({c['tokens_vs_optimal']:.2g}x of it)"],
    ], ["compute", "value"])
    print_table([[v["device"], f"{v['peak_flops'] / 1e12:,.3g} TFLOP/s", f"{v['utilisation']:.0%}",
                  f"{v['device_hours']:,.3g}", _human_s(v["seconds"])] for v in c["time"].values()],
                ["device", "peak", "utilisation", "device-hours", f"time on {c['n_devices']}"])


estimate.__doc__ = (estimate.__doc__ or "") + "\n" + EXAMPLES
