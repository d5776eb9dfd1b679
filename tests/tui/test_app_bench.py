"""The chat app's benchmark (tui/app/bench.py) runs the real app headless against the real engine."""

from __future__ import annotations

import json

import pytest

from gptchat.tui.app import bench


@pytest.mark.slow
def test_bench_streams_through_the_app_and_times_model_ready(tiny_model):
    b = bench.run(tiny_model, tokens=8, rounds=1, launches=1, log=lambda s: None)
    assert b.generate_tps[0] > 0 and b.app_tps[0] > 0
    assert 1 < b.app_tokens[0] <= 8 and 1 <= b.app_chunks[0] <= b.app_tokens[0]
    assert b.ratio == b.app_tps[0] / b.generate_tps[0]
    assert 0 < b.ready_s[0] < b.launch_ready_s[0]
    parts = b.launch_parts
    assert parts["imports done"] < parts["first screen up"] < parts["model ready"]
    assert b.launch_paint_s == [parts["first screen up"]]
    d = json.loads(json.dumps(b.to_dict()))
    assert d["ratio"] == round(b.ratio, 3) and d["tokens"] == 8
    text = bench.format_report(b)
    assert "ratio" in text and "model ready" in text and "first screen" in text


@pytest.mark.slow
def test_bench_suite_carries_every_benchmark_in_one_json(capsys):
    """`gptchat bench --suite --json`: the engine's figures and start-up, eval, finetune and the app's, measured."""
    from gptchat.tui.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "--shape", "nano", "--repeats", "1", "--batch-sizes", "1", "--new-tokens", "4",
              "--prompt-tokens", "16", "--no-reference", "--json"])
    assert e.value.code in (0, None)
    d = json.loads(capsys.readouterr().out)
    assert list(d) == ["engine", "startup", "eval", "finetune", "app"]
    assert d["engine"]["results"][1]["ours"] > 0 and d["engine"]["bandwidth_gbs"] > 0
    assert d["startup"]["torch_s"] > 0 and d["startup"]["first_token_s"] > 0  # one round each: no order under load
    assert d["eval"]["shape"] == "nano" and d["eval"]["eval_window_tok_s"] > 0
    assert d["finetune"]["params"] > 0 and d["finetune"]["peak_rss_mb"]["ours"] > 0
    assert d["app"]["app_tps"][0] > 0 and d["app"]["launch_ready_s"][0] > 0
