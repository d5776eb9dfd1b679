"""Command palette entries for templates, local models and common settings."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from gptchat.core.prompting.templates import list_templates
from gptchat.tui.app.screens.experiment import ExperimentScreen


class GptchatCommands(Provider):
    """"template: few-shot", "model: gpt2", "greedy on" ...: each applies to the next message."""

    def _entries(self) -> list[tuple[str, str, str, str]]:
        out = [(f"template: {t.name}", t.description, "template", t.name) for t in list_templates()[0]]
        for m in self.app.pool.loaded():
            out.append((f"model: {m.spec}", "switch to this loaded model", "model", m.spec))
        out += [("greedy on", "always take the most likely token", "greedy", "on"),
                ("greedy off", "sample with temperature / top-k / top-p", "greedy", "off"),
                ("seed: random", "a new random seed for every reply", "seed", "none"),
                ("experiments", "each study's table and perplexity chart; start a new study", "screen", "experiment")]
        return out

    def _apply(self, name: str, value: str) -> None:
        if name == "screen":  # a screen to open, not a setting
            self.app.push_screen(ExperimentScreen())
            return
        controller = getattr(self.app.screen, "controller", None)  # only the chat screen has one
        if controller is not None:
            controller.apply_setting(name, value)
        else:
            self.app.notify("settings change from the chat screen", severity="warning")

    async def discover(self) -> Hits:
        for title, help, name, value in self._entries():
            yield DiscoveryHit(title, partial(self._apply, name, value), help=help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help, name, value in self._entries():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(self._apply, name, value), help=help)
