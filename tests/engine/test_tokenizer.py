"""Our tokenizer (a checkpoint's files, or GPT-2's shipped copy) against tiktoken's own "gpt2" and transformers'."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path

import pytest

from gptchat.core.errors import TokenizerError
from gptchat.core.text import tokenizer as tokmod
from gptchat.core.text.tokenizer import gpt2_tokenizer, load_tokenizer, tokenizer_from_folder
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
        yield tiktoken.get_encoding("gpt2")
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


# -- GPT-2's BPE shipped with gptchat ---------------------------------------------------------------


def test_shipped_files_are_the_ones_tiktoken_pins():
    import tiktoken_ext.openai_public as openai_public

    gpt2_src, r50k_src = inspect.getsource(openai_public.gpt2), inspect.getsource(openai_public.r50k_base)
    assert tokmod.GPT2_ENCODER_JSON_SHA256 in gpt2_src and tokmod.GPT2_VOCAB_BPE_SHA256 in gpt2_src
    assert tokmod.GPT2_TIKTOKEN_SHA256 in r50k_src
    shipped = tokmod.files("gptchat.core.text") / "gpt2"
    assert hashlib.sha256((shipped / "encoder.json").read_bytes()).hexdigest() == tokmod.GPT2_ENCODER_JSON_SHA256
    assert hashlib.sha256((shipped / "vocab.bpe").read_bytes()).hexdigest() == tokmod.GPT2_VOCAB_BPE_SHA256


@pytest.mark.parametrize("vocab_size", [None, 50257, 50304])
def test_no_files_offline_uses_the_shipped_bpe(tmp_path, tiktoken_gpt2, vocab_size):
    # conftest: empty GPTCHAT_HOME, HF cache and tiktoken cache, HF_HUB_OFFLINE=1
    tok = load_tokenizer(tmp_path, vocab_size) if vocab_size else load_tokenizer(None)
    assert tok.source.endswith("gpt2/encoder.json") and tok.enc.name == "gpt2"
    assert (tok.n_vocab, tok.eot_id) == (50257, 50256)
    for text in TRICKY:
        assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def _cached_ranks_file() -> Path:
    from gptchat.core.paths import get_paths

    (cached,) = (get_paths().cache / "tokenizers").glob("*.ranks")
    return cached


def test_fast_form_is_cached_and_read_back_as_the_same_vocabulary(tiktoken_gpt2):
    tokmod._loaded.clear()
    built = gpt2_tokenizer()  # parses the shipped files, then writes the fast form
    cached = _cached_ranks_file()
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == cached.name.split(".")[1]
    tokmod._loaded.clear()
    read = gpt2_tokenizer()  # from the fast form
    assert read.enc._mergeable_ranks == built.enc._mergeable_ranks == tiktoken_gpt2._mergeable_ranks
    assert read.enc.name == "gpt2"  # the name that keys tokenized datasets survives the cache
    assert read.encode("Hello world") == [15496, 995]
    assert cached.stat().st_mtime_ns == _cached_ranks_file().stat().st_mtime_ns  # read, not rewritten


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_fast_form_is_rebuilt_when_damaged(damage):
    tokmod._loaded.clear()
    gpt2_tokenizer()
    cached = _cached_ranks_file()
    good = cached.read_bytes()
    bad = {"truncate": good[:-100], "flip": good[:200] + bytes([good[200] ^ 1]) + good[201:],
           "garbage": b"\x00" * 64, "empty": b""}[damage]
    cached.write_bytes(bad)  # its name's sha256 no longer matches
    tokmod._loaded.clear()
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]
    assert _cached_ranks_file().read_bytes() == good


@pytest.mark.parametrize("cut", [0, 10, 24, 30, 1000])
def test_malformed_fast_form_is_rejected_even_with_a_matching_hash(cut):
    """A well-hashed file that is not in the format (another tool, another version) is not trusted."""
    tokmod._loaded.clear()
    gpt2_tokenizer()
    data = _cached_ranks_file().read_bytes()
    assert tokmod._parse_ranks(data) is not None
    assert tokmod._parse_ranks(data[:cut]) is None
    assert tokmod._parse_ranks(data + b"x") is None  # a length table that does not cover the bytes


def test_fast_form_cache_that_cannot_be_written_still_loads(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(tokmod, "_cache_folder", lambda: blocker / "tokenizers")
    tokmod._loaded.clear()
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]
    assert blocker.is_file() and not list(tmp_path.glob("**/*.tmp"))


def test_a_damaged_shipped_file_is_refused(monkeypatch):
    monkeypatch.setattr(tokmod, "GPT2_VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(TokenizerError, match=r"vocab.bpe is damaged .* reinstall gptchat"):
        gpt2_tokenizer()


# -- a checkpoint's own vocabulary -------------------------------------------------------------------


def test_tokenizer_json_alone_as_transformers_5_saves_it(vocab_dir, tmp_path, tiktoken_gpt2):
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast.from_pretrained(str(vocab_dir)).save_pretrained(str(tmp_path / "hf"))
    assert not any((tmp_path / "hf" / n).exists() for n in ("vocab.json", "merges.txt"))
    doc = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(doc["model"]["merges"][0], list)  # transformers 5 writes [a, b] pairs
    (tmp_path / "old").mkdir()  # older tokenizers wrote "a b" strings
    doc["model"]["merges"] = [" ".join(m) for m in doc["model"]["merges"]]
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    for folder in (tmp_path / "hf", tmp_path / "old"):
        tok = load_tokenizer(folder, 50257)
        assert tok.source == str(folder / "tokenizer.json") and tok.enc.name == "gpt2" and tok.eot_id == 50256
        for text in TRICKY:
            assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text), (folder.name, text)


def _small_bpe(folder, n_merges=5):
    """A vocabulary that is not GPT-2's: its first n_merges merges only."""
    enc_json, bpe = gpt2_vocab_files()
    vocab = {t: i for t, i in json.loads(enc_json.read_text(encoding="utf-8")).items() if i < 256 + n_merges}
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = bpe.read_text(encoding="utf-8").split("\n")
    (folder / "merges.txt").write_text("\n".join(lines[: 1 + n_merges]) + "\n", encoding="utf-8")
    return folder


def test_own_vocabulary_is_used_never_gpt2s(tmp_path, vocab_dir):
    tok = load_tokenizer(_small_bpe(tmp_path / "own"), 50257)
    assert tok.n_vocab == 256 + 5 + 1 and tok.enc.name != "gpt2" and tok.source.endswith("own/vocab.json")
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert len(tok.encode("the cat sat")) > len(gpt2_tokenizer().encode("the cat sat"))
    with pytest.raises(TokenizerError, match="1000-token vocabulary is not GPT-2's"):
        load_tokenizer(tmp_path / "empty", 1000)  # no files, not GPT-2-sized: never GPT-2's silently
    with pytest.raises(TokenizerError, match=r"larger than the model's embedding table \(1000\)"):
        load_tokenizer(vocab_dir, 1000)


def test_vocab_without_merges_is_refused(tmp_path):
    shutil.copyfile(gpt2_vocab_files()[0], tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match=r"vocab.json has no merges file beside it \(merges.txt\)"):
        load_tokenizer(tmp_path)


GARBAGE = {
    "not UTF-8": b"\x80\x81\xfe\xff" * 100,
    "not JSON": b"{ this is not json",
    "wrong shape": b'["a", "b"]',
    "no merges header": b"a b\nc d\n",
    "a merge of three": "#version: 0.2\nĠ t x\n".encode(),
    "not byte-level": json.dumps({"\u2581the": 0}).encode(),
}


@pytest.mark.parametrize("case", GARBAGE)
@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer.json"])
def test_garbage_tokenizer_files_are_one_clear_error(tmp_path, case, name):
    if name != "tokenizer.json":
        shutil.copyfile(gpt2_vocab_files()[0], tmp_path / "vocab.json")
        shutil.copyfile(gpt2_vocab_files()[1], tmp_path / "merges.txt")
    (tmp_path / name).write_bytes(GARBAGE[case])
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path, 50257)
    msg = str(e.value)
    assert str(tmp_path / name) in msg or (name in msg and str(tmp_path) in msg), msg
    assert "\n" not in msg and "Traceback" not in msg


def test_checkpoints_without_tokenizer_files(tmp_path):
    from gptchat.core.generate.loaded import open_model
    from tests.factory import hf_model, save

    nano = save(hf_model(n_layer=1, n_head=2, n_embd=32, vocab_size=50304), tmp_path / "nano", fmt="nanogpt", vocab=False)
    tok = open_model(str(nano)).tokenizer  # nanoGPT ships no tokenizer files; offline, nothing cached
    assert tok.source.endswith("gpt2/encoder.json") and tok.enc.name == "gpt2"
    other = save(hf_model(n_layer=1, n_head=2, n_embd=32, vocab_size=1000), tmp_path / "other", vocab=False)
    with pytest.raises(TokenizerError, match="1000-token vocabulary is not GPT-2's"):
        open_model(str(other))
