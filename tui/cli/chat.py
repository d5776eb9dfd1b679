"""`gptchat chat` (and plain `gptchat`): the Textual chat app."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gptchat.tui.cli.common import (
    DeviceOpt, DtypeOpt, GreedyOpt, MaxNewTokensOpt, ModelOpt, RepetitionPenaltyOpt, TemperatureOpt, TopKOpt, TopPOpt,
)


def chat(
    model: ModelOpt = None,
    template: Annotated[str, typer.Option("--template", "-t", help="The prompt template for chat messages (`gptchat templates list`).")] = "chat",
    shots: Annotated[Optional[int], typer.Option(help="How many examples few-shot templates show. Default: the template's.", show_default=False)] = None,
    examples: Annotated[Optional[str], typer.Option(help="A JSONL or TSV file of examples for the template.", show_default=False)] = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    greedy: GreedyOpt = False,
    max_new_tokens: MaxNewTokensOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for every reply. Default: a new random seed each reply (saved in history).", show_default=False)] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Open the chat app: stream replies, stop with Escape, compare models, search history.

    Examples:
      gptchat
      gptchat chat --model ./my-finetune --template chat --temperature 0.7
      gptchat chat -m gpt2-medium --greedy
    """
    # heavy imports (torch, textual) stay inside the command so `gptchat --help` is fast
    from gptchat.core.errors import GptchatError
    from gptchat.core.session.settings import settings_from
    from gptchat.core.session.store import Store

    settings = settings_from(  # UsageError (exit 2) before the app starts
        model=model, template=template, shots=shots, examples=examples, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, greedy=greedy, max_new_tokens=max_new_tokens, seed=seed,
        device=device, dtype=dtype)
    store, store_error = None, None
    try:
        store = Store.open_default()
    except GptchatError as e:
        store_error = str(e)
    from gptchat.tui.app.app import GptchatApp

    GptchatApp(settings, store=store, store_error=store_error).run()
