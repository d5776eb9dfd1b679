"""The SQLite history: migrations, provenance, search, export, and surviving a kill mid-reply."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from gptchat.core.errors import GptchatError
from gptchat.core.session import store as store_mod
from gptchat.core.session.store import MIGRATIONS, Store, new_id


@pytest.fixture
def db(tmp_path):
    s = Store(tmp_path / "h.sqlite3")
    yield s
    s.close()


def test_migrations_recorded_and_applied_once(tmp_path):
    s = Store(tmp_path / "h.sqlite3")
    assert s.migrations() == [name for name, _ in MIGRATIONS]
    assert s.migrate() == []
    s.close()
    s2 = Store(tmp_path / "h.sqlite3")  # reopening applies nothing new
    assert s2.migrate() == []
    assert s2.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s2.close()


def test_new_migration_is_applied_on_open(tmp_path, monkeypatch):
    Store(tmp_path / "h.sqlite3").close()
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS + [("m999_extra", "CREATE TABLE extra (x INTEGER);")])
    s = Store(tmp_path / "h.sqlite3")
    assert s.migrations()[-1] == "m999_extra"
    s.db.execute("INSERT INTO extra VALUES (1)")
    s.close()


def test_ids_sort_by_time():
    ids = [new_id() for _ in range(200)]
    assert ids == sorted(ids) and len(set(ids)) == 200


def test_provenance_round_trip(db):
    c = db.new_conversation()
    db.add_message(c.id, "user", "What is the capital of France?")
    r = db.add_message(c.id, "assistant", "", status="streaming", model="gpt2", checkpoint_hash="abc",
                       template="chat", options={"temperature": 0.7, "top_k": 40}, examples_used=["#1"], seed=7)
    db.update_message(r.id, content="Paris.", status="done", prompt_tokens=30, completion_tokens=3,
                      finish_reason="stop", timings={"tokens_per_s": 12.5})
    msgs = db.messages(c.id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    m = msgs[1]
    assert (m.content, m.status, m.model, m.checkpoint_hash, m.template, m.seed) == ("Paris.", "done", "gpt2", "abc", "chat", 7)
    assert m.options == {"temperature": 0.7, "top_k": 40} and m.examples_used == ["#1"]
    assert m.timings == {"tokens_per_s": 12.5} and m.prompt_tokens == 30 and m.completion_tokens == 3
    conv = db.conversation(c.id)
    assert conv.name == "What is the capital of France?" and conv.n_messages == 2


def test_search_rename_delete(db):
    a = db.new_conversation()
    db.add_message(a.id, "user", "tell me about jupiter's moons")
    b = db.new_conversation()
    db.add_message(b.id, "user", "a poem about the sea")
    r = db.add_message(b.id, "assistant", "", status="streaming")
    db.update_message(r.id, content="waves of green glass")
    assert [c.id for c in db.conversations("jupit")] == [a.id]
    assert [c.id for c in db.conversations("glass")] == [b.id]  # updated content is indexed
    assert db.conversations('"quote( *') == []  # odd input is not an SQL/FTS error
    db.rename(a.id, "Moons")
    assert db.conversation(a.id).name == "Moons"
    assert [c.id for c in db.conversations("moons")] == [a.id]
    db.delete(a.id)
    assert db.conversation(a.id) is None and db.messages(a.id) == []
    assert [c.id for c in db.conversations()] == [b.id]
    assert [m.content for m in db.search_messages("waves")] == ["waves of green glass"]


def test_export(db):
    c = db.new_conversation(name="Geo")
    db.add_message(c.id, "user", "Capital of France?")
    db.add_message(c.id, "assistant", "Paris.", model="gpt2", template="chat", seed=3, completion_tokens=2,
                   finish_reason="stop", options={"temperature": 0.7})
    md = db.export_markdown(c.id)
    assert md.startswith("# Geo") and "## User" in md and "Paris." in md and "seed 3" in md
    js = db.export_json(c.id)
    json.dumps(js)
    assert js["conversation"]["name"] == "Geo" and js["messages"][1]["options"] == {"temperature": 0.7}


def test_kill_mid_reply_loses_nothing_written(tmp_path):
    """A process writes a user message and half a reply, then dies without closing: both are there."""
    path = tmp_path / "h.sqlite3"
    code = textwrap.dedent(f"""
        import os
        from gptchat.core.session.store import Store
        s = Store({str(path)!r})
        c = s.new_conversation()
        s.add_message(c.id, "user", "hello there")
        r = s.add_message(c.id, "assistant", "", status="streaming")
        s.update_message(r.id, content="General Ken")
        os._exit(9)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    s = Store(path)
    (c,) = s.conversations()
    msgs = s.messages(c.id)
    assert [(m.role, m.content, m.status) for m in msgs] == [
        ("user", "hello there", "done"), ("assistant", "General Ken", "streaming")]
    s.close()


def test_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "h.sqlite3"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(store_mod.StoreError, match="history database"):
        Store(bad)
    assert issubclass(store_mod.StoreError, GptchatError)  # so the CLI and the app show it as one line
    assert sqlite3.sqlite_version_info >= (3, 9)
