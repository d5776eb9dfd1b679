"""`gptchat chat` (and plain `gptchat`): the Textual chat app."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gptchat.tui.cli.common import DeviceOpt, DtypeOpt, ModelOpt


def chat(
    model: ModelOpt = None,
    template: Annotated[str, typer.Option("--template", "-t", help="The prompt template for chat messages (`gptchat templates list`).")] = "chat",
    shots: Annotated[Optional[int], typer.Option(help="How many examples few-shot templates show. Default: the template's.", show_default=False)] = None,
    examples: Annotated[Optional[str], typer.Option(help="A JSONL or TSV file of examples for the template.", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature, >= 0; 0 means greedy. Default: the template's.", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens; 0 turns it off. Default: the template's.", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass, 0 to 1; 1 turns it off. Default: the template's.", show_default=False)] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the most likely token.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="The most tokens per reply. Default: the template's.", show_default=False)] = None,
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
    from gptchat.core.session.chat import ChatSettings, parse_setting
    from gptchat.core.errors import GptchatError

    given = dict(template=template, shots=shots, examples=examples, temperature=temperature, top_k=top_k,
                 top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    values = {k: parse_setting(k, str(v)) for k, v in given.items() if v is not None}  # UsageError if bad
    settings = ChatSettings(model=model, greedy=greedy, device=device, dtype=dtype, **values)

    from gptchat.core.session.store import Store

    store, store_error = None, None
    try:
        store = Store.open_default()
    except GptchatError as e:
        store_error = str(e)
    from gptchat.tui.app.app import GptchatApp

    GptchatApp(settings, store=store, store_error=store_error).run()
