"""`gptchat models` and `gptchat pull`."""

from __future__ import annotations

from typing import Annotated

import typer

from gptchat.tui.cli.common import JsonOpt, err, print_json
from gptchat.tui.format import human_bytes, human_count
from gptchat.tui.cli.table import print_table


def models(json_out: JsonOpt = False) -> None:
    """List the GPT-2 checkpoints on this machine.

    Looks in the Hugging Face cache, gptchat's finetune runs and registered models, and the current
    folder (one level deep). Pass a NAME from the first column to --model.
    """
    from gptchat.core.weights.discover import local_models

    found = local_models()
    if json_out:
        from dataclasses import asdict

        print_json([asdict(m) for m in found])
        return
    if not found:
        err("no GPT-2 checkpoints found here. Get one with `gptchat pull gpt2` (online), pass a folder "
            "with --model PATH, or train one: `gptchat finetune data.txt --from-scratch`")
        return
    rows = [(m.name, m.format, human_count(m.params), human_bytes(m.size_bytes), m.shape, str(m.path)) for m in found]
    print_table(rows, ("NAME", "FORMAT", "PARAMS", "SIZE", "SHAPE", "PATH"))


def pull(
    name: Annotated[str, typer.Argument(help="A hub name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or owner/repo.")],
) -> None:
    """Download a GPT-2 model into the Hugging Face cache (needs the network).

    Example: gptchat pull gpt2-medium
    """
    from gptchat.core.weights import hub
    from gptchat.core.weights.checkpoints import sniff
    from gptchat.core.errors import UsageError

    if not hub.looks_like_repo_id(name):
        raise UsageError(f"{name!r} is not a hub name; use gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 or owner/repo")
    snap = hub.cached_snapshot(name)
    if snap is not None:
        err(f"{name} is already in the Hugging Face cache: {snap}")
        return
    snap = hub.download(name, how="run this again with the network up and HF_HUB_OFFLINE unset")
    ck = sniff(snap, name=name)  # refuse what is not GPT-2 now rather than at first use
    err(f"{name}: {human_count(ck.config.n_params())} parameters, {human_bytes(ck.size_bytes)} at {snap}")
