"""Training data: file checks with clear errors, the token cache, the split, and the batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptchat.core.errors import DataError
from gptchat.core.train import data
from tests.train.util import corpus_text, write_corpus


def test_text_is_tokenized_once_with_eot_between_documents(tmp_path, tokenizer):
    f = tmp_path / "a.txt"
    f.write_text("Hello world.<|endoftext|>Second doc here.\n", encoding="utf-8")
    ds = data.prepare([f], tokenizer)
    ids = [int(t) for t in ds.tokens]
    expected = tokenizer.encode("Hello world.") + [50256] + tokenizer.encode("Second doc here.\n") + [50256]
    assert ids == expected
    assert ds.tokens.dtype == np.uint16 and ds.mask is None
    assert (ds.folder / "DONE").exists() and ds.folder.parent.name == "datasets"
    # the same content again: the cache answers (same folder, no rebuild)
    mtime = (ds.folder / "tokens.bin").stat().st_mtime_ns
    g = tmp_path / "copy.txt"
    g.write_bytes(f.read_bytes())
    ds2 = data.prepare([g], tokenizer)
    assert ds2.folder == ds.folder and (ds2.folder / "tokens.bin").stat().st_mtime_ns == mtime
    # different content: a different key
    g.write_text("Something else", encoding="utf-8")
    assert data.prepare([g], tokenizer).key != ds.key


def test_folder_collects_text_files_in_order_and_skips_empty(tmp_path, tokenizer):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.md").write_text("bee", encoding="utf-8")
    (d / "a.txt").write_text("ay", encoding="utf-8")
    (d / "sub" / "c.rst").write_text("sea", encoding="utf-8")
    (d / "empty.txt").write_text("  \n", encoding="utf-8")
    (d / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    warnings = []
    files, _ = data.scan([d], warn=warnings.append)
    assert [f.relative_to(d).as_posix() for f in files] == ["a.txt", "b.md", "sub/c.rst"]
    assert warnings and "empty.txt" in warnings[0]
    ds = data.prepare([d], tokenizer)
    assert tokenizer.decode([int(t) for t in ds.tokens]) == "ay<|endoftext|>bee<|endoftext|>sea<|endoftext|>"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "looks like a binary file"),
        ("café".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match="bad.txt") as e:
        data.scan([f])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.scan([tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.txt"):
        data.scan([tmp_path / "empty"])
    with pytest.raises(DataError, match="no training data"):
        data.scan([])


def test_jsonl_masks_the_prompt_and_ends_completions_with_eot(tmp_path, tokenizer):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Q: capital of France?\nA:", "completion": " Paris"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    ds = data.prepare([f], tokenizer, fmt="jsonl")
    ids, mask = [int(t) for t in ds.tokens], [int(m) for m in ds.mask]
    want_ids, want_mask = [], []
    for r in rows:
        p, c = tokenizer.encode(r["prompt"]), tokenizer.encode(r["completion"]) + [50256]
        want_ids += p + c
        want_mask += [0] * len(p) + [1] * len(c)
    assert ids == want_ids and mask == want_mask
    # targets: y is -1 where the *target* token is part of a prompt
    x, y = data.windows(ds, [0], len(ids) - 1)
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


def test_jsonl_through_a_template(tmp_path, tokenizer):
    from gptchat.core.prompting.templates import Budget, render

    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "hello", "completion": " bonjour"}) + "\n", encoding="utf-8")
    ds = data.prepare([f], tokenizer, fmt="jsonl", template="zero-shot")
    p = render("zero-shot", {"input": "hello"}, tokenizer=tokenizer, budget=Budget(reserve=0)).ids
    assert [int(t) for t in ds.tokens] == p + tokenizer.encode(" bonjour") + [50256]
    assert int(ds.mask[len(p) - 1]) == 0 and int(ds.mask[len(p)]) == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "pairs.jsonl:2: not valid JSON"),
        ('{"prompt": "x"}', 'pairs.jsonl:2: expected an object with "prompt" and "completion"'),
        ('{"prompt": "x", "completion": 3}', "must be strings"),
        ('{"prompt": "x", "completion": " "}', "the completion is empty"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.scan([f], fmt="jsonl")
    assert message in str(e.value)


def test_split_is_a_contiguous_tail_and_refuses_too_little_data():
    sp = data.split(10_000, 64, 0.1)
    assert sp.train == (0, 9000) and sp.val == (9000, 10_000)
    assert data.split(1000, 128, 0.01).val == (1000 - 129, 1000)  # at least one block + 1
    with pytest.raises(DataError, match="too few"):
        data.split(200, 128, 0.1)


def test_batch_order_is_a_function_of_step_and_splits_the_same_way_over_ranks(tmp_path, tokenizer):
    ds = data.prepare([write_corpus(tmp_path, 20_000)], tokenizer)
    sp = data.split(ds.n_tokens, 32, 0.1)
    b = data.Batches(ds, sp.train, 32, seed=7)
    # one process, 2 micro-batches of 4 == two ranks, 1 micro-batch of 4 each: the same 8 windows
    single = [data.Batches(ds, sp.train, 32, 7).micro_batch(3, m, 0, 1, 2, 4)[0] for m in range(2)]
    ranks = [data.Batches(ds, sp.train, 32, 7).micro_batch(3, 0, r, 2, 1, 4)[0] for r in range(2)]
    assert all((a == c).all() for a, c in zip(single, ranks))
    # an epoch visits every window once; the next epoch in another order
    starts = b.window_starts(0, b.n_chunks)
    assert len(set(starts)) == b.n_chunks
    assert all(sp.train[0] <= s and s + 33 <= sp.train[1] for s in starts)
    assert b.window_starts(b.n_chunks, b.n_chunks) != starts
    assert data.Batches(ds, sp.train, 32, seed=8).window_starts(0, 8) != starts[:8]


def test_corpus_helper_is_real_text():
    text = corpus_text(5000)
    assert len(text) == 5000 and "def " in text
