"""Our tokenizer, built from local files, against tiktoken's own "gpt2" encoding and transformers'."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from gptchat.core.errors import TokenizerError
from gptchat.core.text.tokenizer import load_tokenizer, tokenizer_from_folder
from tests.factory import gpt2_vocab_files

TRICKY = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nmany",
    "naïve café, déjà vu — “quotes” and ‘apostrophes’",
    "日本語のテキストと中文文本",
    "emoji 😀👍🏽 and family 👨‍👩‍👧‍👦",
    "<|endoftext|> typed as text must stay text",
    "don't won't I'll we've they're she'd",
    "numbers 1234567890 3.14159 1e-5 0xFF",
    "code: def f(x):\n    return x**2  # comment",
    "\u200b zero width, \u00a0 nbsp, \r\n crlf",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº–≠",
    "a" * 300,
    "",
]


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own GPT-2 encoding, fed from its cache (filled with the same sha256-checked files)."""
    import os

    import tiktoken
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    enc_json, bpe = gpt2_vocab_files()
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for src, name in ((bpe, "vocab.bpe"), (enc_json, "encoder.json")):
        shutil.copyfile(src, cache / hashlib.sha1((base + name).encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        enc = tiktoken.get_encoding("gpt2")
        enc.cache_dir = str(cache)  # for the fallback test
        yield enc
    finally:
        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.mark.parametrize("text", TRICKY)
def test_ids_equal_tiktoken_gpt2(tokenizer, tiktoken_gpt2, text):
    assert tokenizer.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_ids_equal_transformers(tokenizer, vocab_dir):
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(vocab_dir))
    assert len(hf) == 50257  # the trap: constructing it from file paths gives an empty vocabulary
    for text in TRICKY:
        if "<|endoftext|>" in text:
            continue  # HF maps the typed marker to the special token; we deliberately never do
        assert tokenizer.encode(text) == hf.encode(text), text


def test_typed_endoftext_is_not_the_special_token(tokenizer):
    ids = tokenizer.encode("<|endoftext|>")
    assert 50256 not in ids and len(ids) > 1
    assert tokenizer.eot_id == 50256 and tokenizer.n_vocab == 50257


def test_openai_file_names_work_too(tmp_path):
    enc_json, bpe = gpt2_vocab_files()
    shutil.copyfile(enc_json, tmp_path / "encoder.json")
    shutil.copyfile(bpe, tmp_path / "vocab.bpe")
    tok = tokenizer_from_folder(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]


def test_stream_decoder_never_splits_a_character(tokenizer):
    text = "emoji 😀👍🏽 日本語 and family 👨‍👩‍👧‍👦 ok"
    ids = tokenizer.encode(text)
    # at least one token of this text is a partial UTF-8 sequence on its own
    assert any(_is_partial(tokenizer.token_bytes(i)) for i in ids)
    dec = tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_merges_that_do_not_match_the_vocab_are_refused(tmp_path):
    enc_json, bpe = gpt2_vocab_files()
    shutil.copyfile(enc_json, tmp_path / "vocab.json")
    lines = bpe.read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap two merge ranks
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TokenizerError, match="merge order"):
        tokenizer_from_folder(tmp_path)


def test_no_vocabulary_offline_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="gptchat pull gpt2"):
        load_tokenizer(tmp_path)  # empty folder, offline, nothing cached anywhere


def test_falls_back_to_tiktoken_cache(tmp_path, tiktoken_gpt2, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", tiktoken_gpt2.cache_dir)
    tok = load_tokenizer(tmp_path)
    assert tok.source == "tiktoken:gpt2"
    assert tok.encode("Hello world") == [15496, 995]
