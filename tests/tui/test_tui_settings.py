"""`/set NAME VALUE` for every setting under every spelling, valid and invalid: the app keeps running,
a valid value changes the setting, an invalid one is a notification (the TUI once closed on
``/set top-p 1``). Also: commands with bad arguments, and a failed model switch keeps the working model."""

from __future__ import annotations

from gptchat.core.session.store import Store
from tests.session.test_options import INVALID, SPELLINGS, VALID
from tests.tui.helpers import chat_screen, make_app, run, send, wait_for, wait_ready

# The chat's own settings, beside the generation options of tests/session/test_options.py.
CHAT_VALID = {"template": ["raw", "chat"], "shots": ["2", "default"]}
CHAT_INVALID = {"template": ["no-such-template"], "shots": ["-1", "some"], "examples": ["/no/such/file.jsonl"]}


def _recorder(app) -> list[str]:
    """Every notification the app shows, kept (the app's own list forgets them when they time out)."""
    seen: list[str] = []
    notify = app.notify

    def record(message, *a, **kw):
        seen.append(str(message))
        return notify(message, *a, **kw)

    app.notify = record
    return seen


async def _type(pilot, app, seen: list[str], command: str) -> str:
    """Send a slash command and wait for the notification it gives; returns it."""
    n = len(seen)
    await send(pilot, app, command)
    await wait_for(pilot, lambda: len(seen) > n, 20, f"a notification for {command!r}")
    assert app.is_running and chat_screen(app).is_attached, command
    return seen[n]


def test_set_every_setting_and_alias_valid_and_invalid(tiny_model):
    from gptchat.core.generate import options

    app = make_app(tiny_model, None)

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            seen = _recorder(app)
            checked = 0
            for name, spellings in SPELLINGS.items():
                for sp in sorted(spellings):
                    for text in VALID[name]:
                        note = await _type(pilot, app, seen, f"/set {sp} {text}")
                        want = options.parse(name, text)
                        assert getattr(app.session.settings, name) == want, (sp, text, note)
                        assert note.startswith(f"{name} = "), note
                        checked += 1
                    for text in INVALID[name]:
                        before = getattr(app.session.settings, name)
                        note = await _type(pilot, app, seen, f"/set {sp} {text}")
                        assert name in note, (sp, text, note)
                        assert getattr(app.session.settings, name) == before
                        checked += 1
            for name, values in CHAT_VALID.items():
                for text in values:
                    note = await _type(pilot, app, seen, f"/{name} {text}")
                    assert note.startswith(f"{name} = ") and getattr(app.session.settings, name) == (
                        None if text == "default" else int(text) if name == "shots" else text), note
            for name, values in CHAT_INVALID.items():
                for text in values:
                    before = app.session.settings
                    note = await _type(pilot, app, seen, f"/set {name} {text}")
                    assert app.session.settings == before and note, (name, text)
            return checked, app.session.settings

    checked, s = run(go())
    assert checked == sum(len(sp) * (len(VALID[n]) + len(INVALID[n])) for n, sp in SPELLINGS.items())
    assert (s.top_p, s.temperature) == (0.9, 2.0)  # the last valid value of each stuck


def test_commands_with_bad_arguments_are_notifications(tiny_model, tmp_path):
    app = make_app(tiny_model, Store(tmp_path / "h.sqlite3"))
    bad = ["/set", "/set nosuch 1", "/set temp", "/frobnicate", "/rename", "/export md", "/unload",
           "/shots x", "/template nope", "/examples /nope.jsonl", "/temp hot"]

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            seen = _recorder(app)
            return [await _type(pilot, app, seen, c) for c in bad]

    notes = run(go())
    assert "usage: /set NAME VALUE" in notes[0]
    assert "no setting 'nosuch'" in notes[1]
    assert notes[2] == "temperature = default"  # no value: back to the template's
    assert "unknown command /frobnicate" in notes[3]
    assert "not saved yet" in notes[4] and "not saved yet" in notes[5]
    assert "usage: /unload NAME" in notes[6]
    assert "temperature must be a number" in notes[10]


def test_a_failed_model_switch_keeps_the_working_model(tiny_model, tmp_path):
    app = make_app(tiny_model, None)

    async def go():
        async with app.run_test(size=(130, 45)) as pilot:
            await wait_ready(pilot, app)
            scr = chat_screen(app)
            seen = _recorder(app)
            await send(pilot, app, f"/model {tmp_path / 'missing'}")
            await wait_for(pilot, lambda: any("still using" in n for n in seen), 30, "the failed switch")
            await send(pilot, app, "/set dtype int4")
            await wait_for(pilot, lambda: sum("still using" in n for n in seen) == 2, 30, "the second failed switch")
            return scr.loaded, app.session.settings, seen

    loaded, s, seen = run(go())
    assert loaded is not None and loaded.spec == tiny_model
    assert (s.model, s.dtype) == (tiny_model, None)
