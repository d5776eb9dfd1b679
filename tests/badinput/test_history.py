"""History stays private and survives many processes: folders 0700, files 0600, a fresh database
opened by 30 processes at once, and a GPTCHAT_HOME that cannot be used reported in one line."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptchat.core.errors import PathError
from gptchat.core.paths import get_paths, open_private, private_dir, private_file
from gptchat.core.session.store import MIGRATIONS, Store, export_file


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def _loose_umask():
    """The usual umask (022) would make everything world-readable unless gptchat sets modes itself."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_history_folder_and_files_are_private():
    store = Store.open_default()
    conv = store.new_conversation()
    store.add_message(conv.id, "user", "my secret question")
    db = get_paths().history_db
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    assert wal.exists() and shm.exists()  # WAL mode, still open
    assert mode(db.parent) == 0o700
    assert (mode(db), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)
    store.close()


def test_older_world_readable_history_is_tightened():
    data = get_paths().data
    data.mkdir(parents=True, mode=0o755)
    db = get_paths().history_db
    old = sqlite3.connect(db)  # as an older gptchat left it: 0644 in a 0755 folder
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    os.chmod(db, 0o644)
    os.chmod(data, 0o755)
    wal = db.with_name(db.name + "-wal")
    os.chmod(wal, 0o644)
    Store(db).close()
    assert mode(data) == 0o700 and mode(db) == 0o600 and mode(wal) == 0o600
    old.close()


def test_default_export_is_private():
    store = Store.open_default()
    conv = store.new_conversation()
    store.add_message(conv.id, "user", "hello")
    path = export_file(store, conv.id, "md")
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert "hello" in path.read_text()


def test_private_dir_creates_every_missing_level_0700(tmp_path):
    d = private_dir(tmp_path / "a" / "b" / "c")
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", d)] == [0o700] * 3
    (tmp_path / "open").mkdir(mode=0o755)
    assert mode(private_dir(tmp_path / "open")) == 0o700  # an existing folder is tightened
    assert private_dir(d) == d  # and calling it again is harmless


def test_private_file_and_open_private_are_0600(tmp_path):
    f = private_file(tmp_path / "f")
    assert mode(f) == 0o600 and f.read_bytes() == b""
    loose = tmp_path / "loose"
    loose.write_text("kept")
    os.chmod(loose, 0o644)
    assert mode(private_file(loose)) == 0o600 and loose.read_text() == "kept"  # tightened, not truncated
    for m, data in (("w", "one\n"), ("a", "two\n")):
        with open_private(tmp_path / "log.txt", m) as fh:
            fh.write(data)
    assert (tmp_path / "log.txt").read_text() == "one\ntwo\n" and mode(tmp_path / "log.txt") == 0o600
    with open_private(tmp_path / "blob", "xb") as fh:
        fh.write(b"\x00")
    assert mode(tmp_path / "blob") == 0o600
    with pytest.raises(FileExistsError):
        open_private(tmp_path / "blob", "x")


def test_home_that_is_a_file_is_one_clear_line(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("GPTCHAT_HOME", str(home))
    with pytest.raises(PathError) as e:
        Store.open_default()
    msg = str(e.value)
    assert "\n" not in msg and f"{home} is a file, not a folder" in msg and "GPTCHAT_HOME" in msg


def test_home_that_cannot_be_created_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCHAT_HOME", "/proc/gptchat-cannot-exist/home")
    with pytest.raises(PathError) as e:
        Store.open_default()
    assert "\n" not in str(e.value) and str(e.value).startswith("cannot create the folder /proc/gptchat-cannot-exist")


CHILD = r"""
import sys, time
from pathlib import Path
from gptchat.core.session.store import Store
db, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():  # start together: the race is the point
    time.sleep(0.001)
s = Store(db)
c = s.new_conversation("p")
s.add_message(c.id, "user", "hello from " + ready.name)
s.close()
"""


@pytest.mark.slow
def test_thirty_processes_open_a_fresh_history_at_once(tmp_path):
    db = tmp_path / "data" / "history.sqlite3"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(tmp_path / f"ready{i}"), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(30)
    ]
    deadline = time.monotonic() + 300
    while sum((tmp_path / f"ready{i}").exists() for i in range(30)) < 30:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child died before the start"
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    failed = [err for rc, err in results if rc != 0]
    assert not failed, failed[0]
    con = sqlite3.connect(db)
    assert [r[0] for r in con.execute("SELECT name FROM _migrations ORDER BY name")] == [n for n, _ in MIGRATIONS]
    assert con.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 30
    assert con.execute("SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH 'hello'").fetchone()[0] == 30
    con.close()
    assert mode(db) == 0o600 and mode(db.parent) == 0o700
