"""Every generation setting through every front end: the options module (text and typed values), a
template's [options], a batch JSONL row, the CLI flag on a tiny real model, and ChatSettings (what
``/set`` and the settings panel use; tests/tui/test_tui_settings.py types them into the app).

One table of cases drives all of them, so a setting's range cannot differ between front ends
without a test failing here."""

from __future__ import annotations

import json
import math

import pytest

from gptchat.core.batch.io import Skipped, read_rows
from gptchat.core.batch.jobs import Cell, Settings, build_jobs
from gptchat.core.errors import BatchInputError, TemplateError, UsageError
from gptchat.core.generate import options
from gptchat.core.paths import get_paths
from gptchat.core.prompting.templates import get_template
from gptchat.core.session.settings import ChatSettings, setting_name, settings_from
from gptchat.tui.cli.main import main
from tests.factory import hf_model, save

# Text as a person types it. Boundaries included: top-p 0 and 1, top-k 0, temperature 0, max 1.
VALID = {
    "temperature": ["0", "0.5", "2"],
    "top_k": ["0", "1", "5"],
    "top_p": ["0", "1", "0.9"],
    "repetition_penalty": ["1", "1.3", "0.5"],
    "max_new_tokens": ["1", "7"],
    "greedy": ["on", "off"],
    "seed": ["0", "42"],
}
INVALID = {
    "temperature": ["-0.1", "hot", "nan", "inf"],
    "top_k": ["-1", "2.5", "many"],
    "top_p": ["-0.01", "1.01", "nan", "half"],
    "repetition_penalty": ["0", "-1", "inf"],
    "max_new_tokens": ["0", "-5", "1.5"],
    "greedy": ["maybe", "2"],
    "seed": ["lucky", "1.5"],
}
SPELLINGS = {  # every alias must keep working: the TUI crashed on /set top-p 1 once
    "temperature": {"temperature", "temp"},
    "top_k": {"top_k", "top-k", "topk"},
    "top_p": {"top_p", "top-p", "topp"},
    "repetition_penalty": {"repetition_penalty", "repetition-penalty", "rep"},
    "max_new_tokens": {"max_new_tokens", "max-new-tokens", "max", "max_tokens", "max-tokens", "n"},
    "greedy": {"greedy"},
    "seed": {"seed"},
}
TEMPLATED = options.NAMES


def typed(text: str):
    """What a TOML file or a JSON row would hold for this text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"on": True, "off": False}.get(text, text)


def cases(table, names=None):
    return [(n, v) for n, vs in table.items() if names is None or n in names for v in vs]


def test_the_table_covers_every_setting_and_spelling():
    assert set(VALID) == set(INVALID) == set(SPELLINGS) == set(options.SETTINGS)
    for name, spellings in SPELLINGS.items():
        assert set(options.spellings(name)) <= spellings
        for sp in spellings | {sp.upper() for sp in spellings}:
            assert options.canonical(sp) == name, sp
    assert options.canonical("top-q") is None
    assert set(TEMPLATED) == {"temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"}


# -- the options module ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,text", cases(VALID))
def test_parse_accepts_valid_text_under_every_spelling(name, text):
    want = options.parse(name, text)
    assert want == typed(text) and type(want) is options.SETTINGS[name].type
    for sp in SPELLINGS[name]:
        assert options.parse(sp, text) == want


@pytest.mark.parametrize("name,text", cases(INVALID))
def test_parse_and_check_refuse_invalid_values_naming_the_setting(name, text):
    with pytest.raises(ValueError, match=name):
        options.parse(name, text)
    with pytest.raises(ValueError, match=name):
        options.check(name, typed(text))


def test_default_and_off_words():
    for name in options.SETTINGS:
        if options.SETTINGS[name].type is not bool:
            assert options.parse(name, "default") is None and options.parse(name, "") is None
    assert [options.parse(n, "off") for n in ("top_k", "top_p", "repetition_penalty", "greedy")] == [0, 1.0, 1.0, False]
    with pytest.raises(ValueError, match="no off value"):
        options.parse("max_new_tokens", "off")


def test_resolve_and_sampling_params():
    o = options.resolve({"top_p": 0.5, "top_k": None}, {"top_k": 7, "temperature": 0.1}, options.DEFAULTS)
    assert o == {"temperature": 0.1, "top_k": 7, "top_p": 0.5, "repetition_penalty": 1.0, "max_new_tokens": 128}
    params, n = options.sampling_params(o, greedy=True)
    assert (params.top_p, params.top_k, params.temperature, params.greedy, n) == (0.5, 7, 0.1, True, 128)
    # the defaults are the bottom layer: config.toml's [sampling] over DEFAULTS (core/config.py)
    o = options.resolve({}, {"top_k": 7}, {**options.DEFAULTS, "top_k": 3, "top_p": 0.8})
    assert (o["top_k"], o["top_p"]) == (7, 0.8)  # the template's own value above the default, the default below
    with pytest.raises(ValueError, match="top_p must be between 0 and 1"):
        options.sampling_params({**o, "top_p": 1.5})


# -- a template's [options] -----------------------------------------------------------------------


def _template(name: str, value) -> None:
    folder = get_paths().templates
    folder.mkdir(parents=True, exist_ok=True)
    toml_value = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    (folder / "t.toml").write_text(f'description = "d"\nkind = "raw"\n[options]\n{name} = {toml_value}\n')


@pytest.mark.parametrize("name,text", cases(VALID, TEMPLATED))
def test_template_option_valid(name, text):
    _template(name, typed(text))
    assert get_template("t").options[name] == typed(text)


@pytest.mark.parametrize("name,text", cases(INVALID, TEMPLATED))
def test_template_option_invalid(name, text):
    _template(name, typed(text))
    with pytest.raises(TemplateError, match=f"t.toml: key options.{name}: {name} must be"):
        get_template("t")


# -- a batch JSONL row ----------------------------------------------------------------------------


def _row_job(tokenizer, key: str, value):
    line = json.dumps({"prompt": "hello", key: value})
    rows = read_rows("rows.jsonl", line + "\n", "jsonl", templated=False, skip_bad=False, skipped=[])
    skipped: list[Skipped] = []
    return build_jobs(rows, Cell("m"), 0, tokenizer, 1024, Settings(), skipped, "rows.jsonl")


@pytest.mark.parametrize("name,text", cases(VALID, (*TEMPLATED, "seed", "greedy")))
def test_batch_row_valid(tokenizer, name, text):
    (job,) = _row_job(tokenizer, name, typed(text))
    got = {"max_new_tokens": job.max_new_tokens, "seed": job.seed, **job.params.to_dict()}[name]
    assert got == typed(text)


@pytest.mark.parametrize("name,text", cases(INVALID, (*TEMPLATED, "seed", "greedy")))
def test_batch_row_invalid(tokenizer, name, text):
    with pytest.raises((BatchInputError, ValueError), match=name):
        _row_job(tokenizer, name, typed(text))


# -- the CLI flag, on a tiny real model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save(hf_model(n_positions=64, seed=1), tmp_path_factory.mktemp("opt") / "tiny"))


def _generate(capsys, *args) -> tuple[int, str, str]:
    try:
        main(["generate", "hi", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name,text", cases(VALID, TEMPLATED))
def test_cli_flag_valid(tiny, capsys, name, text):
    flag = options.SETTINGS[name].flag
    extra = [] if name == "max_new_tokens" else ["-n", "2"]
    code, out, err = _generate(capsys, "--model", tiny, flag, text, *extra, "--seed", "1", "--json")
    assert code == 0, err
    d = json.loads(out)
    got = d["max_new_tokens"] if name == "max_new_tokens" else d["sampling"][name]
    assert got == typed(text)


@pytest.mark.parametrize("name,text", cases(INVALID, TEMPLATED))
def test_cli_flag_invalid(tiny, capsys, name, text):
    code, out, err = _generate(capsys, "--model", tiny, options.SETTINGS[name].flag, text, "--json")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    if typed(text) == text or (options.SETTINGS[name].type is int and isinstance(typed(text), float)):
        assert "Invalid value" in err  # Click refuses text that is not a number of the flag's type
    else:
        assert lines == [lines[0]] and lines[0].startswith(f"error: {name} must be"), err


def test_cli_help_comes_from_the_table(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in TEMPLATED:
        s = options.SETTINGS[name]
        assert s.flag in text and " ".join(options.cli_help(name).split()) in text


# -- ChatSettings: what /set, the settings panel and `gptchat chat` use --------------------------


@pytest.mark.parametrize("name,text", cases(VALID))
def test_chat_settings_valid_under_every_spelling(name, text):
    for sp in SPELLINGS[name]:
        assert setting_name(sp) == name
        assert getattr(ChatSettings().with_value(sp, text), name) == typed(text)


@pytest.mark.parametrize("name,text", cases(INVALID))
def test_chat_settings_invalid_is_a_usage_error(name, text):
    for sp in SPELLINGS[name]:
        with pytest.raises(UsageError, match=name):
            ChatSettings().with_value(sp, text)


def test_chat_cli_values_are_checked_before_the_app_starts():
    assert settings_from(top_p=1.0, temperature=0.0, template="chat").top_p == 1.0
    with pytest.raises(UsageError, match="top_p must be between 0 and 1"):
        settings_from(top_p=1.5, template="chat")
    with pytest.raises(UsageError, match="no setting 'top-q'"):
        ChatSettings().with_value("top-q", "1")
