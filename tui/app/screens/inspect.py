"""Why the model wrote that: each token of a reply with its probability, rank and the alternatives at
that step, coloured by surprise, then the sampler's filters on the next token (`gptchat inspect`,
one key away). The scoring runs in a thread worker; the screen only draws its result."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from gptchat.tui.app import engine_thread
from gptchat.tui.format import surprise_style


def inspect_text(result: dict, top: int) -> Text:
    """The reply token by token (surprise colours), then one line per token and per filter step."""
    t = Text()
    t.append(f"{result['model']}: perplexity {result['perplexity']:.2f} over {len(result['tokens'])} tokens\n\n",
             style="bold")
    for tok in result["tokens"]:
        t.append(tok["text"], style=surprise_style(tok["logprob"]))
    t.append("\n\n")
    for tok in result["tokens"]:
        alts = "  ".join(f"{a['text']!r} {a['prob']:.3f}" for a in tok["top"][:top])
        t.append(f"{tok['text']!r:>16} ", style=surprise_style(tok["logprob"]))
        t.append(f"p={tok['prob']:.4f} rank {tok['rank']:<6} {alts}\n")
    t.append("\nnext token, step by step through the sampler\n", style="bold")
    for s in result["next"]["stages"]:
        gone = f" (-{s['removed_count']} tokens, {s['removed_mass']:.3f} of the mass)" if s["removed_count"] else ""
        alts = "  ".join(f"{a['text']!r} {a['prob']:.3f}" for a in s["top"][:top])
        t.append(f"{s['name']:>18}: {s['kept']} kept{gone}  {alts}\n")
    return t


class InspectView(ModalScreen[None]):
    """``lm``: a LoadedModel; ``context_ids`` + ``reply_ids``: the prompt and the reply to score."""

    BINDINGS = [Binding("escape,q", "dismiss(None)", "Close")]

    def __init__(self, lm, context_ids: list[int], reply_ids: list[int], params, top: int = 5) -> None:
        super().__init__()
        self.lm, self.context_ids, self.reply_ids, self.params, self.top = lm, context_ids, reply_ids, params, top

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="dialog", classes="wide"):
            yield Label("Inspect the reply  (colour = surprise: green expected, red surprising; Esc closes)",
                        classes="panel-title")
            yield Static("scoring the reply ...", id="inspect-text")

    def on_mount(self) -> None:
        self.score()

    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False)
    def score(self) -> None:
        from gptchat.core.generate.inspect import inspect_model  # torch: loaded with the first inspection

        try:
            result = engine_thread.run(inspect_model, self.lm, self.context_ids + self.reply_ids, self.params,
                                       self.top, score_from=len(self.context_ids))
            text = inspect_text(result, self.top)
        except Exception as e:  # shown in the view: a failed inspection must not take the chat down
            text = Text(f"could not inspect this reply: {e}", style="bold red")
        self.app.call_from_thread(self.query_one("#inspect-text", Static).update, text)
