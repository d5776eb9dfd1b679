"""`gptchat chat` (and plain `gptchat`): the Textual chat app."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gptchat.tui.cli.common import (
    DeviceOpt, DtypeOpt, GreedyOpt, MaxNewTokensOpt, ModelOpt, QuantizeOpt, RepetitionPenaltyOpt, TemperatureOpt, TopKOpt,
    TopPOpt,
)


def chat(
    model: ModelOpt = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="The prompt template for chat messages (`gptchat templates list`). Default: the last one used, else chat.", show_default=False)] = None,
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
    quantize: QuantizeOpt = None,
) -> None:
    """Open the chat app: stream replies, stop with Escape, compare models, search history.

    Examples:
      gptchat
      gptchat chat --model ./my-finetune --template chat --temperature 0.7
      gptchat chat -m gpt2-medium --greedy
      gptchat chat --device cpu --quantize int8
    """
    # heavy imports (torch, textual) stay inside the command so `gptchat --help` is fast
    from gptchat.core.errors import GptchatError
    from gptchat.core.session.prefs import startup_settings
    from gptchat.core.session.store import Store

    settings = startup_settings(dict(  # a flag given wins over the last launch's setting; UsageError (exit 2)
        model=model, template=template, shots=shots, examples=examples, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, greedy=greedy or None, max_new_tokens=max_new_tokens,
        seed=seed, device=device, dtype=dtype, quantize=quantize))
    _check_start(model, device, dtype)
    store, store_error = None, None
    try:
        store = Store.open_default()
    except GptchatError as e:
        store_error = str(e)
    from gptchat.tui.app.app import GptchatApp

    GptchatApp(settings, store=store, store_error=store_error).run()


def _check_start(model: str | None, device: str | None, dtype: str | None) -> None:
    """What can be checked before the app starts, so a typo is one line and exit 2, not a crash inside the app:
    the device and dtype words (core/model/words.py), a GPU named with --device being there, and a model
    given as a path. A hub name not in the cache is left to the app, which downloads it. Only a named GPU
    costs torch's import here: otherwise the app paints first and imports torch with the model."""
    from gptchat.core.errors import DeviceError, ModelNotFound, UsageError
    from gptchat.core.model.words import device_word, dtype_word
    from gptchat.core.weights.checkpoints import resolve
    from gptchat.core.weights.hub import looks_like_repo_id

    from gptchat.core import config

    config.load()  # a bad config.toml: its one line and exit 2 here (inside the app it is said, then ignored)
    try:
        kind, _ = device_word(device)
        dtype_word(dtype)
        if kind in ("cuda", "mps"):
            from gptchat.core.model.device import pick_device

            pick_device(device)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    if model is None:
        return
    try:
        resolve(model, download=False)
    except ModelNotFound as e:
        if not looks_like_repo_id(model):
            raise UsageError(str(e)) from None
