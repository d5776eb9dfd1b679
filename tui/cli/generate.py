"""`gptchat generate`: one completion, streamed to stdout or as one JSON object."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Annotated, Optional

import typer

from gptchat.core.config import default_model, sampling_defaults
from gptchat.core.errors import UsageError
from gptchat.core.generate import options
from gptchat.core.prompting.templates import Budget, format_explain, get_template, load_examples, render
from gptchat.tui.cli.common import (
    CompileOpt, DeviceOpt, DtypeOpt, GreedyOpt, JsonOpt, MaxNewTokensOpt, ModelOpt, RepetitionPenaltyOpt, TemperatureOpt, TopKOpt,
    QuantizeOpt, TopPOpt, err, print_json, sampling_given,
)

EXAMPLES = """
\b
Examples:
  gptchat generate "Ganymede is a moon of" --model ./my-gpt2-dir --max-new-tokens 40
  echo "The capital of France is" | gptchat generate - --model gpt2 --greedy --json
  gptchat generate "Q: What is 2+2?\\nA:" --stop "\\nQ:" --temperature 0.7 --seed 7
"""

# GPT-2's window is 1024 tokens and no GPT-2 token is longer than 128 bytes, so no prompt over 128 KiB
# can be used whole (text averages ~4 bytes a token: 1 MiB is ~250k tokens, over any window a config may
# declare). A template keeps what fits of a longer input; 1 MiB leaves room for that and refuses a runaway
# file (a 50 MB prompt) before tokenising it costs a gigabyte of memory.
MAX_PROMPT_BYTES = 1 << 20


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt text, or - to read it from stdin.", show_default=False)] = None,
    model: ModelOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    greedy: GreedyOpt = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed, prompt and options give the same text. Default: random, printed with --json.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when the model writes this text (not printed); repeatable. \\n and \\t escapes are understood.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating after <|endoftext|>.")] = False,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Render the prompt through a template (`gptchat templates list`); the prompt fills its input.")] = None,
    shots: Annotated[Optional[int], typer.Option(help="How many examples the template shows the model (0 = zero-shot). Default: the template's.")] = None,
    examples: Annotated[Optional[str], typer.Option(help="A JSONL or TSV file of examples for the template (replaces its built-in ones).")] = None,
    var: Annotated[Optional[list[str]], typer.Option("--var", help="A template variable, NAME=VALUE; repeatable.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Print the token budget and the exact prompt text on stderr before the completion.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    compile: CompileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate a completion of a prompt with a GPT-2 model."""
    text = _read_prompt(prompt)
    stops = tuple(options.unescape(s) for s in (stop or []))
    if template is None and (shots is not None or examples or var):
        raise UsageError("--shots, --examples and --var need a --template (see `gptchat templates list`)")
    tpl = None
    if template is not None:
        tpl = get_template(template)
    given = sampling_given(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    variables, opts = _options(given, tpl, greedy, seed, stops, var)  # checked before the model loads
    params = opts.params
    # torch-backed modules load here, inside the command, so `gptchat --help` stays fast
    from gptchat.core.generate.loaded import open_model

    tty = sys.stderr.isatty()
    if tty and not json_out:
        err(f"loading {model or default_model()} ...")
    lm = open_model(model, device=device, dtype=dtype, quantize=quantize, compile=compile)
    rendered = None
    if tpl is not None:
        reserve = opts.max_new_tokens
        if max_new_tokens is None:  # a template's default must not crowd out the input on small windows
            reserve = min(reserve, lm.engine.n_ctx // 2)
        rendered = _render(tpl, text, variables, examples, shots, seed, lm, reserve)
        ids = rendered.ids
        opts = replace(opts, max_new_tokens=reserve, stop=tuple(dict.fromkeys(stops + tuple(rendered.stop))))
        if explain:
            err(format_explain(rendered))
    else:
        ids = lm.tokenizer.encode(text)
        if explain:
            err(f"budget: no template, {len(ids)} prompt tokens + {opts.max_new_tokens} reserved "
                f"of a {lm.engine.n_ctx}-token window\n----- prompt text -----\n{text}\n----- end of prompt text -----")
    comp = _run(lm, ids, opts, stream=not json_out, ignore_eos=ignore_eos)
    for note in comp.notes:
        err(f"note: {note}")
    if json_out:
        print_json({
            **lm.describe(),
            "prompt": text,
            "completion": comp.text,
            "finish_reason": comp.finish_reason,
            "prompt_tokens": comp.prompt_tokens,
            "completion_tokens": comp.completion_tokens,
            "seed": comp.seed,
            "sampling": params.to_dict(),
            # the number the run could use: the window lowers a larger request (comp.notes says so)
            "max_new_tokens": min(opts.max_new_tokens, lm.engine.n_ctx - comp.prompt_tokens),
            "notes": comp.notes,
            "stop": list(opts.stop),
            "template": rendered.to_dict() if rendered is not None else None,
            "timings": {"load_s": round(lm.load_s, 4), "prefill_s": round(comp.prefill_s, 4),
                        "decode_s": round(comp.decode_s, 4), "tokens_per_s": round(comp.tokens_per_s, 2)},
        })
    elif tty:
        err(f"[{comp.completion_tokens} tokens, {comp.tokens_per_s:.1f} tok/s, {comp.finish_reason}, seed {comp.seed}]")


def _options(given: dict, tpl, greedy: bool, seed: int | None, stops: tuple, var: list[str] | None):
    """The --var values and GenOptions: each option from its flag, else the template, else the default."""
    from gptchat.core.generate.text import GenOptions  # torch: see generate()

    try:
        variables = options.parse_vars(var)
        params, n_new = options.sampling_params(options.resolve(given, tpl.options if tpl else None, sampling_defaults()), greedy)
        return variables, GenOptions(params=params, max_new_tokens=n_new, seed=seed, stop=stops)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _render(tpl, text, variables, examples, shots, seed, lm, reserve):
    variables = {**variables, tpl.input_variable: text}
    pool = load_examples(examples, tpl.example_fields) if examples else None
    budget = Budget(n_ctx=lm.engine.n_ctx, reserve=reserve)
    return render(tpl, variables, None, lm.tokenizer, budget, examples=pool, shots=shots,
                  seed=seed if seed is not None else 0)


def _run(lm, ids, opts, stream: bool, ignore_eos: bool):
    from gptchat.core.generate.text import stream as stream_text

    comp = None
    for chunk in stream_text(lm.engine, lm.tokenizer, ids, opts, ignore_eos=ignore_eos):
        if stream and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        comp = chunk.completion or comp
    if stream:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return comp


def _read_prompt(prompt: str | None) -> str:
    if prompt is None:
        raise UsageError("give a prompt: gptchat generate \"Once upon a time\" (or - to read stdin)")
    if prompt == "-":
        if sys.stdin.isatty():
            err("reading the prompt from stdin; end it with Ctrl+D")
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)  # bounded: a huge stdin is refused unread
        _check_size(len(data), "stdin")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("stdin is not UTF-8 text") from None
        text = text[:-1] if text.endswith("\n") else text
    else:
        text = prompt
        _check_size(len(text.encode("utf-8", "surrogatepass")), "the prompt")
    if not text:
        raise UsageError("the prompt is empty; give the model some text to continue")
    return text


def _check_size(n_bytes: int, what: str) -> None:
    if n_bytes > MAX_PROMPT_BYTES:
        raise UsageError(f"{what} is over {MAX_PROMPT_BYTES >> 20} MiB, far more than a model's window holds "
                         f"(GPT-2: 1024 tokens, ~4 KB of text); give the part you want the model to continue")


generate.__doc__ = (generate.__doc__ or "") + "\n" + EXAMPLES
