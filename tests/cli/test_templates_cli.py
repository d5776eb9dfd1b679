"""`gptchat templates list | show | path`.

Most tests drive the Typer sub-app in-process (fast); the subprocess tests run the real entry
point, and are skipped while the main CLI still misses modules other issues add.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import resources

from typer.testing import CliRunner

from gptchat.core.errors import TemplateError
from gptchat.core.paths import get_paths
from gptchat.core.prompting.templates import get_template
from gptchat.tui.cli.templates import app

BUNDLED = ["chat", "classify", "few-shot", "few-shot-qa", "one-shot", "raw", "summarise", "translate-en-fr", "zero-shot"]


def run(*args):
    return CliRunner().invoke(app, list(args))


def _user_file(name: str, text: str):
    folder = get_paths().templates
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(text, encoding="utf-8")


def test_list_shows_every_bundled_template_with_kind():
    r = run("list")
    assert r.exit_code == 0, r.output
    rows = [line.split(None, 3) for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == BUNDLED
    for name, kind, source, description in rows:
        t = get_template(name)
        assert (kind, source, description) == (t.kind, "bundled", t.description)


def test_list_json():
    r = run("list", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert [d["name"] for d in data] == BUNDLED
    assert data[BUNDLED.index("chat")] == {
        "name": "chat",
        "kind": "chat",
        "description": get_template("chat").description,
        "source": "bundled",
        "overrides_bundled": False,
        "path": "gptchat/prompts/chat.toml",
    }


def test_list_marks_user_overrides_and_reports_broken_files():
    _user_file("raw", 'description = "My raw."\nkind = "raw"\n')
    _user_file("mine", 'description = "Mine."\nkind = "zero-shot"\n')
    _user_file("broken", 'description = "x"\nkind = "raw"\nstops = ["\\n"]\n')
    r = run("list")
    assert r.exit_code == 0
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "broken" not in rows and rows["mine"].split(None, 3)[1:] == ["zero-shot", "user", "Mine."]
    assert rows["raw"].split(None, 3)[1:] == ["raw", "user*", "My raw."]
    assert "broken.toml: unknown key 'stops'" in r.stderr and r.stderr.startswith("* a user template")
    data = {d["name"]: d for d in json.loads(run("list", "--json").stdout)}
    assert data["raw"]["overrides_bundled"] and data["raw"]["source"] == "user"
    assert data["raw"]["path"] == str(get_paths().templates / "raw.toml")


def test_show_prints_the_file_as_valid_toml_with_notes():
    r = run("show", "few-shot-qa")
    assert r.exit_code == 0, r.output
    bundled = resources.files("gptchat.prompts").joinpath("few-shot-qa.toml").read_text(encoding="utf-8")
    assert bundled.rstrip("\n") in r.stdout
    assert tomllib.loads(r.stdout) == tomllib.loads(bundled)
    assert "# variable question: your input text" in r.stdout
    assert "# example fields: question, answer (6 built-in, 3 shown by default)" in r.stdout
    assert '# stop at: "\\nQ:"  "\\n\\n"' in r.stdout
    assert "# default options: temperature=0.3 top_k=40 top_p=0.9 max_new_tokens=48" in r.stdout


def test_show_variables_with_defaults_and_required():
    assert '# variable task: default "Write the opposite of each word."' in run("show", "few-shot").stdout
    _user_file("needs", 'description = "d"\nkind = "zero-shot"\ninstruction = "Act as {role}."\n')
    assert "# variable role: required: --var role=..." in run("show", "needs").stdout


def test_show_json():
    r = run("show", "classify", "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    t = get_template("classify")
    assert d["variables"] == {"labels": "positive, negative", "text": None}
    assert d["input_variable"] == "text" and d["example_fields"] == ["text", "label"]
    assert d["options"] == {"temperature": 0.0, "max_new_tokens": 4} == t.options
    assert d["stop"] == ["\n"] and d["examples"] == 6 and d["default_shots"] == 4
    assert d["text"] == t.text and d["kind"] == "few-shot"


def test_show_unknown_template_is_a_template_error():
    r = run("show", "nope")
    assert isinstance(r.exception, TemplateError)
    assert "no template named 'nope'; available: chat, classify" in str(r.exception)


def test_path():
    r = run("path")
    assert r.exit_code == 0 and r.stdout.strip() == str(get_paths().templates)
    assert "does not exist yet" in r.stderr
    d = json.loads(run("path", "--json").stdout)
    assert d == {"templates": str(get_paths().templates), "exists": False}


def test_help_lists_the_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("list", "show", "path"):
        assert f"\n  {cmd} " in r.stdout


def test_the_command_module_does_not_load_torch_or_textual():
    code = (
        "import sys; from gptchat.tui.cli import templates; "
        "templates.app(['list', '--json'], standalone_mode=False); "
        "print(sorted(m for m in ('torch', 'textual') if m in sys.modules), file=sys.stderr)"  # Rich is fine: tables
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip() == "[]" and len(json.loads(out.stdout)) == len(BUNDLED)


def gptchat(*args):
    return subprocess.run([sys.executable, "-m", "gptchat.tui", *args], capture_output=True, text=True)


def test_main_cli_lists_templates():
    r = gptchat("templates", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert [d["name"] for d in json.loads(r.stdout)] == BUNDLED


def test_main_cli_error_is_one_line():
    _user_file("bad", 'description = "x"\nkind = "raw"\n[options]\ntop_p = 2\n')
    r = gptchat("templates", "show", "bad")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {get_paths().templates / 'bad.toml'}: key options.top_p: top_p must be between 0 and 1 (1 means off), got 2"]
