"""Prompt templates: loading and strict validation, rendering, exact token budgets, overflow steps,
examples files. Token counts are checked against the real GPT-2 vocabulary."""

from __future__ import annotations

import json

import pytest

from gptchat import prompts
from gptchat.core.errors import ContextOverflow, TemplateError
from gptchat.core.generate import options as gen_options
from gptchat.core.paths import get_paths
from gptchat.core.prompting.templates import Budget, format_explain, get_template, list_templates, load_examples, render

BUNDLED = ["chat", "classify", "few-shot", "few-shot-qa", "one-shot", "raw", "summarise", "translate-en-fr", "zero-shot"]
BIG = Budget(n_ctx=100_000, reserve=0)  # no fitting: to see a template's parts at full size


def _offset_counts(tokenizer, ids, parts):
    """Tokens per part from tiktoken's own character offsets: a second implementation of the
    'a token belongs to the part holding its first character' rule."""
    _, offsets = tokenizer.enc.decode_with_offsets(ids)
    bounds, pos = [], 0
    for p in parts:
        bounds.append((pos, pos + len(p.text)))
        pos += len(p.text)
    return [sum(lo <= o < hi for o in offsets) for lo, hi in bounds]


def _check_exact(r, tokenizer):
    assert r.ids == tokenizer.encode(r.text)
    assert r.text == "".join(p.text for p in r.parts)
    assert sum(p.tokens for p in r.parts) == len(r.ids) == r.n_prompt
    assert [p.tokens for p in r.parts] == _offset_counts(tokenizer, r.ids, r.parts)
    assert r.n_prompt + r.reserve <= r.n_ctx  # what was kept fits the window beside the reply's reserve


def _write_user(name: str, text: str):
    folder = get_paths().templates
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(text, encoding="utf-8")
    return folder / f"{name}.toml"


# -- bundled templates ------------------------------------------------------------------------


def test_every_bundled_template_is_listed_and_valid():
    templates, broken = list_templates()
    assert broken == []
    assert [t.name for t in templates] == BUNDLED
    kinds = {t.kind for t in templates}
    assert kinds == set(prompts.KINDS)
    for t in templates:
        assert t.source == "bundled" and t.description
        assert set(t.options) <= set(gen_options.NAMES)
        if t.takes_examples:  # works without --examples
            assert len(t.examples) >= t.default_shots >= 1


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_template_renders_exactly(name, tokenizer):
    t = get_template(name)
    history = [("user", "Hello there."), ("assistant", "Hi! How can I help?")] if t.kind == "chat" else None
    r = render(t, {t.input_variable: "The quick brown fox."}, history, tokenizer)
    _check_exact(r, tokenizer)
    assert r.reserve == t.options.get("max_new_tokens", 128) and r.n_ctx == 1024  # raw: the default's
    assert r.parts[-1].kind == "input" and "The quick brown fox." in r.parts[-1].text
    assert len(r.examples_used) == (t.default_shots if t.takes_examples else 0)
    assert r.dropped == [] and r.stop == list(t.stop)
    assert "The quick brown fox." in format_explain(r)


def test_part_by_part_encoding_would_miscount(tokenizer):
    # Why render() encodes the whole text: "\n\n" alone is one token (628), before "Q" it is two.
    r = render("few-shot-qa", {"question": "Why?"}, None, tokenizer, shots=1)
    instruction = r.parts[0]
    assert instruction.text == "Answer each question briefly and accurately.\n\n"
    assert tokenizer.encode(instruction.text)[-1] == 628
    assert r.ids[: instruction.tokens][-2:] == [198, 198]
    assert instruction.tokens == len(tokenizer.encode(instruction.text)) + 1
    _check_exact(r, tokenizer)


def test_raw_and_summarise_text(tokenizer):
    assert render("raw", {"input": "Once upon a time"}, None, tokenizer).text == "Once upon a time"
    article = "The council met on Tuesday.\nIt voted to repair the bridge."
    assert render("summarise", {"input": article}, None, tokenizer).text == article + "\nTL;DR:"


def test_translate_uses_the_gpt2_paper_format(tokenizer):
    pool = [{"english": "Thank you.", "french": "Merci."}]
    r = render("translate-en-fr", {"english": "Good night."}, None, tokenizer, examples=pool, shots=1)
    assert r.text == "Thank you. = Merci.\nGood night. ="
    assert r.stop == ["\n"] and r.options["temperature"] == 0


def test_few_shot_qa_text_and_counts(tokenizer):
    pool = [{"question": "What is 2+2?", "answer": "4."}]
    r = render("few-shot-qa", {"question": "How do I resize a VM?"}, None, tokenizer, examples=pool, shots=1)
    assert r.text == (
        "Answer each question briefly and accurately.\n\n"
        "Q: What is 2+2?\nA: 4.\n\n"
        "Q: How do I resize a VM?\nA:"
    )
    # The input starts on a clean token boundary ("\n" | "Q"), so it costs what it costs alone.
    assert r.parts[-1].tokens == len(tokenizer.encode("Q: How do I resize a VM?\nA:"))
    assert r.examples_used == [0] and r.example_ids == ["#1"]


def test_chat_transcript_ends_on_the_assistant_label(tokenizer):
    t = get_template("chat")
    r = render(t, {"input": "  How are you?  "}, [("user", "Hi"), ("assistant", " Hello!")], tokenizer)
    assert r.text == t.instruction + "\n\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    assert "\nUser:" in r.stop
    assert [p.kind for p in r.parts] == ["instruction", "history", "history", "input"]
    _check_exact(r, tokenizer)


def test_chat_labels_are_configurable(tokenizer):
    _write_user("pirate", 'description = "d"\nkind = "chat"\n[chat]\nuser_label = "Q:"\nassistant_label = "Pirate:"\n')
    r = render("pirate", {"input": "Ahoy"}, [("user", "Hi"), ("assistant", "Arr")], tokenizer)
    assert r.text == "Q: Hi\nPirate: Arr\nQ: Ahoy\nPirate:"
    assert r.stop == ["\nQ:"]


def test_shots_are_deterministic_for_a_seed_and_recorded(tokenizer):
    pool = [{"input": f"w{i}", "output": f"o{i}"} for i in range(20)]
    runs = [render("few-shot", {"input": "x"}, None, tokenizer, examples=pool, shots=5, seed=s) for s in (1, 1, 2)]
    assert runs[0].text == runs[1].text and runs[0].examples_used == runs[1].examples_used
    assert runs[0].examples_used != runs[2].examples_used
    for r in runs:
        assert len(set(r.examples_used)) == 5
        shown = [p.text for p in r.parts if p.kind == "example"]
        assert shown == [f"Input: w{i}\nOutput: o{i}\n\n" for i in r.examples_used]
    zero = render("few-shot", {"input": "x"}, None, tokenizer, examples=pool, shots=0)
    # the caller's examples replace the demo task: its instruction is left out, and the render says so
    assert zero.examples_used == [] and zero.text == "Input: x\nOutput:"
    assert "demo instruction" in zero.dropped[0]
    kept = render("few-shot", {"input": "x", "task": "Echo."}, None, tokenizer, examples=pool, shots=0)
    assert kept.text == "Echo.\n\nInput: x\nOutput:" and kept.dropped == []


def test_shots_errors(tokenizer):
    pool = [{"input": "a", "output": "b"}] * 3
    with pytest.raises(TemplateError, match="only 3 examples"):
        render("few-shot", {"input": "x"}, None, tokenizer, examples=pool, shots=4)
    with pytest.raises(TemplateError, match="shows no examples"):
        render("zero-shot", {"input": "x"}, None, tokenizer, shots=2)
    with pytest.raises(TemplateError, match="missing variable 'output'"):
        render("few-shot", {"input": "x"}, None, tokenizer, examples=[{"input": "a"}], shots=1)
    with pytest.raises(TemplateError, match="chat history needs a chat template"):
        render("raw", {"input": "x"}, [("user", "hi")], tokenizer)


# -- variables ----------------------------------------------------------------------------------


def test_variables_defaults_missing_and_unknown(tokenizer):
    r = render("zero-shot", {"input": "x", "task": "Say hi."}, None, tokenizer)
    assert r.text.startswith("Say hi.\n\n")
    assert render("zero-shot", {"input": "x"}, None, tokenizer).text.startswith("Answer the question")
    with pytest.raises(TemplateError, match="missing variable 'question'"):
        render("few-shot-qa", {}, None, tokenizer)
    with pytest.raises(TemplateError, match="does not use variable 'input'.*fills 'question'"):
        render("few-shot-qa", {"input": "x"}, None, tokenizer)


def test_substitution_never_executes_or_reparses(tokenizer):
    _write_user("braces", 'description = "d"\nkind = "raw"\ninput_format = "{{literal}} {input} }}"\n')
    r = render("braces", {"input": "{0.__class__} {input}"}, None, tokenizer)
    assert r.text == "{literal} {0.__class__} {input} }"


def test_a_required_variable_without_default(tokenizer):
    _write_user("needs", 'description = "d"\nkind = "zero-shot"\ninstruction = "Act as {role} for {team}."\n')
    with pytest.raises(TemplateError, match="missing variables 'role', 'team'.*--var"):
        render("needs", {"input": "x"}, None, tokenizer)
    assert render("needs", {"input": "x", "role": "a", "team": "b"}, None, tokenizer).text == "Act as a for b.\n\nx"


# -- strict schema ------------------------------------------------------------------------------

GOOD = 'description = "d"\nkind = "few-shot"\nexample_format = "{q} -> {a}"\ninput_format = "{q} ->"\ninput_variable = "q"\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + "instructions = 'x'\n", "unknown key 'instructions'"),
        ('description = "d"\nkind = "zero-shot"\nexample_format = "{a}"\n', "unknown key 'example_format' for kind 'zero-shot'"),
        ('description = "d"\n', "missing key 'kind'"),
        ('description = "d"\nkind = "three-shot"\n', "key 'kind' is 'three-shot'"),
        ('kind = "raw"\n', "missing key 'description'"),
        ('name = "other"\ndescription = "d"\nkind = "raw"\n', "key 'name' is 'other' but the file is t.toml"),
        (GOOD + "options = 3\n", "key 'options' must be a table"),
        (GOOD + "[separators]\nexamples = '\\n'\n", "unknown key separators.'examples'"),
        (GOOD + "[variables]\nq2 = 'x'\n", "key variables.'q2' is not used"),
        (GOOD + "[chat]\nuser_label = 'U'\n", "unknown key 'chat' for kind 'few-shot'"),
        ('description = "d"\nkind = "raw"\ninput_format = "{text}"\n', "key 'input_format' ('{text}') has no {input}"),
        ('description = "d"\nkind = "raw"\ninput_format = "{input} {a.b}"\n', "key 'input_format': stray '{'"),
        ('description = "d"\nkind = "raw"\ninstruction = "x }"\n', "key 'instruction': stray '}'"),
        ('description = "d"\nkind = "few-shot"\n', "missing key 'example_format'"),
        (GOOD + "[[examples]]\nq = 'x'\n", "examples[0] is missing key 'a'"),
        (GOOD + "[[examples]]\nq = 'x'\na = 'y'\nnote = 'z'\n", "unknown key examples[0].'note'"),
        (GOOD + "[[examples]]\nq = 'x'\na = 1\n", "key 'examples[0].a' must be a string"),
        (GOOD + "shots = 2\n[[examples]]\nq = 'x'\na = 'y'\n", "key 'shots' is 2"),
        (GOOD + "stop = ['']\n", "key stop[0] must be a non-empty string"),
        ('description = "d"\nkind = "raw"\n[chat]\n', "unknown key 'chat' for kind 'raw' (it is used by kind chat)"),
        ('description = "d\nkind = "raw"\n', "not valid TOML"),
    ],
)
def test_strict_schema_errors_name_the_key(text, message):
    with pytest.raises(prompts.TemplateFileError) as e:
        prompts.parse_template(text, "t", path="/x/t.toml")
    assert message in str(e.value) and str(e.value).startswith("/x/t.toml: ")


@pytest.mark.parametrize(
    "options,message",
    [
        ("top_k = '40'", "key options.top_k: top_k must be a whole number, got '40'"),
        ("top_k = 4.0", "key options.top_k: top_k must be a whole number, got 4.0"),
        ("top_p = 1.5", "key options.top_p: top_p must be between 0 and 1"),
        ("top_k = true", "key options.top_k: top_k must be a whole number, got True"),
        ("beam = 2", "unknown key options.'beam'"),
        ("seed = 2", "unknown key options.'seed'"),  # not a template option: it is per message
    ],
)
def test_template_options_are_checked_by_the_options_module(options, message):
    # prompts/ only checks that [options] is a table; core checks names and ranges, by get_template and
    # list_templates alike (a broken file is listed as broken, not hidden).
    path = _write_user("t", GOOD + f"[options]\n{options}\n")
    with pytest.raises(TemplateError) as e:
        get_template("t")
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    templates, broken = list_templates()
    assert "t" not in [t.name for t in templates] and broken == [str(e.value)]


def test_a_good_user_template_parses():
    t = prompts.parse_template(GOOD + "shots = 1\n[[examples]]\nq = 'x'\na = 'y'\nid = 'e1'\n", "t")
    assert t.example_fields == ["q", "a"] and t.default_shots == 1 and t.examples[0]["id"] == "e1"


# -- user templates -----------------------------------------------------------------------------


def test_user_template_overrides_bundled_by_name(tokenizer):
    path = _write_user("few-shot-qa", GOOD.replace('"{q} ->"', '"Question: {q}"') + "[[examples]]\nq = 'x'\na = 'y'\n")
    _write_user("mine", 'description = "mine"\nkind = "raw"\n')
    t = get_template("few-shot-qa")
    assert t.source == "user" and t.overrides_bundled and t.path == str(path)
    templates, broken = list_templates()
    names = [x.name for x in templates]
    assert broken == [] and names.count("few-shot-qa") == 1 and "mine" in names
    assert render("few-shot-qa", {"q": "z"}, None, tokenizer, shots=1).text == "x -> y\n\nQuestion: z"


def test_a_broken_user_override_is_an_error_not_a_fallback():
    _write_user("chat", 'description = "d"\nkind = "chat"\ntemperature = 0.5\n')
    with pytest.raises(TemplateError, match=r"chat\.toml: unknown key 'temperature'"):
        get_template("chat")
    templates, broken = list_templates()
    assert "chat" not in [t.name for t in templates] and len(broken) == 1 and "temperature" in broken[0]


def test_unknown_template_lists_the_names():
    with pytest.raises(TemplateError, match="no template named 'nope'; available: chat, classify"):
        get_template("nope")


def test_a_template_written_with_another_suffix_is_named_not_ignored():
    """mine.yaml (or mine.TOML) in the templates folder is never read: asking for 'mine' says so and how to fix
    it, instead of listing the other names as if the file were not there."""
    folder = _write_user("other", 'description = "d"\nkind = "raw"\n').parent
    (folder / "mine.yaml").write_text('description = "d"\nkind = "raw"\n')
    with pytest.raises(TemplateError, match=r"mine\.yaml is not read, templates are \.toml files; rename it to "
                                            r"mine\.toml"):
        get_template("mine")
    assert any("mine.yaml: templates are .toml files; rename it to mine.toml" in e for e in list_templates()[1])  # listing says so
    (folder / "mine.yaml").rename(folder / "mine.toml")
    assert get_template("mine").name == "mine" and list_templates()[1] == []


# -- budget fitting -----------------------------------------------------------------------------


def _history(n_pairs: int) -> list[tuple[str, str]]:
    turns = []
    for i in range(n_pairs):
        turns += [("user", f"Question number {i}: " + "tell me more " * (5 + i)), ("assistant", f"Answer {i}. " + "Sure. " * (3 + i))]
    return turns


def test_fits_exactly_at_the_limit(tokenizer):
    full = render("chat", {"input": "Last one?"}, _history(3), tokenizer, BIG)
    at_limit = Budget(n_ctx=full.n_prompt + 64, reserve=64)
    r = render("chat", {"input": "Last one?"}, _history(3), tokenizer, at_limit)
    assert r.dropped == [] and r.free == 0 and r.ids == full.ids


def test_drops_the_oldest_turns_first_and_keeps_a_user_turn_first(tokenizer):
    hist = _history(3)
    full = render("chat", {"input": "Last one?"}, hist, tokenizer, BIG)
    turn_tokens = [p.tokens for p in full.parts if p.kind == "history"]
    # One token over: the first user turn must go, and its answer with it.
    r = render("chat", {"input": "Last one?"}, hist, tokenizer, Budget(n_ctx=full.n_prompt + 63, reserve=64))
    _check_exact(r, tokenizer)
    assert r.turns_dropped == 2
    assert r.dropped == [f"dropped 2 oldest chat turns ({turn_tokens[0] + turn_tokens[1]} tokens)"]
    assert "Question number 0" not in r.text and "Answer 0." not in r.text
    assert r.text.split("\n\n", 1)[1].startswith("User: Question number 1")
    # Short enough that four turns must go, not six: the newest exchange stays.
    need = sum(turn_tokens[:3]) + 1
    r = render("chat", {"input": "Last one?"}, hist, tokenizer, Budget(n_ctx=full.n_prompt + 64 - need, reserve=64))
    assert r.turns_dropped == 4 and "Question number 2" in r.text
    assert r.n_prompt + 64 <= r.n_ctx


def test_drops_the_fewest_examples_largest_first(tokenizer):
    pool = [
        {"input": "short", "output": "s"},
        {"input": "long " * 40, "output": "l"},
        {"input": "medium " * 10, "output": "m"},
    ]
    full = render("few-shot", {"input": "x"}, None, tokenizer, BIG, examples=pool, shots=3)
    sizes = {p.label: p.tokens for p in full.parts if p.kind == "example"}
    assert sizes["example #2"] > sizes["example #3"] > sizes["example #1"]
    r = render("few-shot", {"input": "x"}, None, tokenizer, Budget(n_ctx=full.n_prompt + 9, reserve=10), examples=pool, shots=3)
    _check_exact(r, tokenizer)
    assert r.examples_dropped == [1] and sorted(r.examples_used) == [0, 2]
    assert r.dropped[1:] == [f"dropped example #2 ({sizes['example #2']} tokens)"]  # [0]: the demo instruction
    # Room only without both big ones: exactly those two go.
    tight = full.n_prompt + 10 - sizes["example #2"] - sizes["example #3"]
    r = render("few-shot", {"input": "x"}, None, tokenizer, Budget(n_ctx=tight, reserve=10), examples=pool, shots=3)
    assert r.examples_dropped == [1, 2] and r.examples_used == [0]


def test_cuts_the_input_from_the_start_last(tokenizer):
    words = " ".join(f"word{i}" for i in range(400))
    hist = _history(2)
    r = render("chat", {"input": words}, hist, tokenizer, Budget(n_ctx=300, reserve=50))
    _check_exact(r, tokenizer)
    assert r.n_prompt + 50 <= 300
    assert r.turns_dropped == 4 and len(r.dropped) == 2
    assert r.dropped[0].startswith("dropped 4 oldest chat turns")
    kept = r.parts[-1].text[len("User: ") : -len("\nAssistant:")]
    assert words.endswith(kept) and kept.endswith("word399")
    total = len(tokenizer.encode(words))
    assert r.input_cut == total - len(tokenizer.encode(kept)) > 0
    assert r.dropped[1] == f"cut {r.input_cut} tokens from the start of the input (kept the last {total - r.input_cut})"


def test_input_cut_keeps_whole_characters(tokenizer):
    text = "café ünïcødé 🙂🙃 " * 80
    r = render("raw", {"input": text}, None, tokenizer, Budget(n_ctx=60, reserve=10))
    assert "\ufffd" not in r.text and text.endswith(r.text) and r.n_prompt <= 50
    _check_exact(r, tokenizer)


@pytest.mark.parametrize("n_ctx", [90, 120, 200, 400])
def test_never_exceeds_the_window(n_ctx, tokenizer):
    hist = _history(4)
    text = "Tell me about " + "the history of computing " * 30 + "THE END"
    r = render("chat", {"input": text}, hist, tokenizer, Budget(n_ctx=n_ctx, reserve=20))
    assert r.n_prompt + 20 <= n_ctx and r.text.endswith("THE END\nAssistant:")
    r = render("few-shot-qa", {"question": text}, None, tokenizer, Budget(n_ctx=n_ctx, reserve=20))
    assert r.n_prompt + 20 <= n_ctx and "THE END\nA:" in r.text
    # Below that, the chat preamble + 16 input tokens + 20 reserved cannot fit: an error, not a guess.
    with pytest.raises(ContextOverflow, match="at least 16 needed"):
        render("chat", {"input": text}, hist, tokenizer, Budget(n_ctx=60, reserve=20))


def test_clear_error_when_even_the_instruction_cannot_fit(tokenizer):
    _write_user("wordy", 'description = "d"\nkind = "zero-shot"\ninstruction = "' + "Be nice. " * 100 + '"\n')
    with pytest.raises(ContextOverflow, match=r"cannot fit in 256 tokens: without the input it takes \d+ tokens"):
        render("wordy", {"input": "hello " * 50}, None, tokenizer, Budget(n_ctx=256, reserve=64))
    with pytest.raises(ContextOverflow, match="--max-new-tokens below 1024"):
        render("raw", {"input": "x"}, None, tokenizer, Budget(reserve=1024))


def test_the_input_is_never_cut_below_its_minimum(tokenizer):
    _write_user("long", 'description = "d"\nkind = "zero-shot"\ninstruction = "' + " ".join(["Be nice."] * 20) + '"\n')
    text = " word" * 100  # every token is " word", so a cut input starts the way the full one does
    inst = render("long", {"input": text}, None, tokenizer, BIG).parts[0].tokens
    with pytest.raises(ContextOverflow, match="leaving 15 for the input \\(at least 16 needed\\)"):
        render("long", {"input": text}, None, tokenizer, Budget(n_ctx=inst + 15 + 10, reserve=10, min_input=16))
    r = render("long", {"input": text}, None, tokenizer, Budget(n_ctx=inst + 16 + 10, reserve=10, min_input=16))
    assert r.parts[-1].text == " word" * 16 and r.parts[-1].tokens == 16 and r.free == 0


def test_explain_report(tokenizer):
    pool = [{"question": "q" * 200, "answer": "a"}, {"question": "Short?", "answer": "Yes."}]
    r = render("few-shot-qa", {"question": "Why?"}, None, tokenizer, Budget(n_ctx=100, reserve=20), examples=pool, shots=2)
    report = format_explain(r)
    lines = report.splitlines()
    assert lines[0] == "budget: template few-shot-qa, 100-token window"
    assert any(line.split() == ["instruction", str(r.parts[0].tokens)] for line in lines)
    assert any(line.split() == ["prompt", str(r.n_prompt)] for line in lines)
    assert any(line.split() == ["reserved", "for", "the", "reply", "20"] for line in lines)
    assert any(line.split() == ["free", str(r.free)] for line in lines)
    # The dropped example is followed by "Q", which splits its trailing "\n\n" into two tokens.
    dropped_tokens = len(tokenizer.encode("Q: " + "q" * 200 + "\nA: a\n\nQ")) - 1
    assert r.dropped == [f"dropped example #1 ({dropped_tokens} tokens)"]
    assert f"dropped to fit:\n  - dropped example #1 ({dropped_tokens} tokens)\n" in report
    assert 'stop at: "\\nQ:"  "\\n\\n"' in report
    assert report.endswith(r.text + "\n----- end of prompt text -----")
    assert json.loads(json.dumps(r.to_dict()))["n_prompt"] == r.n_prompt


# -- examples files -----------------------------------------------------------------------------


def test_jsonl_examples(tmp_path, tokenizer):
    f = tmp_path / "faq.jsonl"
    rows = [
        {"question": "How do I stop a VM?", "answer": "Run vm stop NAME.", "source": "docs"},
        {"question": "Port?", "answer": 22, "id": "faq-2"},
    ]
    f.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    pool = load_examples(f, ["question", "answer"])
    assert pool == [
        {"question": "How do I stop a VM?", "answer": "Run vm stop NAME.", "id": "faq.jsonl:1"},
        {"question": "Port?", "answer": "22", "id": "faq-2"},
    ]
    r = render("few-shot-qa", {"question": "How do I resize a VM?"}, None, tokenizer, examples=pool, shots=2)
    assert sorted(r.example_ids) == ["faq-2", "faq.jsonl:1"] and "A: 22\n\n" in r.text
    assert r.options == get_template("few-shot-qa").options


def test_tsv_examples_with_escapes(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_text("english\tfrench\n\nHi.\tSalut.\nTwo\\nlines\tDeux\\tcolonnes \\\\n\n", encoding="utf-8")
    assert load_examples(f, ["english", "french"]) == [
        {"english": "Hi.", "french": "Salut.", "id": "pairs.tsv:3"},
        {"english": "Two\nlines", "french": "Deux\tcolonnes \\n", "id": "pairs.tsv:4"},
    ]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("faq.jsonl", '{"question": "a", "answer": "b"}\n{"question": "a", "answer": "b"}\n{"question": "c"\n', "faq.jsonl:3: not valid JSON"),
        ("faq.jsonl", '{"question": "a", "answer": "b"}\n\n["a", "b"]\n', "faq.jsonl:3: expected a JSON object"),
        ("faq.jsonl", '{"question": "a", "answer": "b"}\n{"question": "a"}\n', "faq.jsonl:2: missing key 'answer'"),
        ("faq.jsonl", '{"question": "a", "answer": null}\n', "faq.jsonl:1: 'answer' is null"),
        ("faq.jsonl", "\n\n", "faq.jsonl: no examples"),
        ("faq.tsv", "question\tanswer\na\tb\nc\n", "faq.tsv:3: 1 tab-separated fields, but the header has 2"),
        ("faq.tsv", "q\tanswer\na\tb\n", "faq.tsv:1: the header has no column 'question'"),
        ("faq.tsv", "question\tanswer\tanswer\n", "faq.tsv:1: the header names column 'answer' twice"),
        ("faq.csv", "question,answer\n", "unknown examples format '.csv'"),
    ],
)
def test_bad_examples_files_name_the_line(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    with pytest.raises(TemplateError) as e:
        load_examples(f, ["question", "answer"])
    assert message in str(e.value)


def test_missing_examples_file(tmp_path):
    with pytest.raises(TemplateError, match="examples file not found"):
        load_examples(tmp_path / "nope.jsonl", ["question", "answer"])
