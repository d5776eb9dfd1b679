"""Chat history in SQLite: conversations and messages with full provenance per reply.

The schema is built only by named, append-only migrations (recorded in ``_migrations`` and applied
on open), ids sort by time, options live in JSON columns and an FTS5 index covers every message.
The database runs in WAL mode and every write commits at once, so a killed process loses nothing
already written: the user's message is stored before generation starts and the reply row is
created when it starts streaming and updated as it goes (``status`` says how it ended).

History is private: the folder is 0700 and the database 0600 (SQLite gives its -wal and -shm files
the database's mode). Many processes may open one database at once, even a fresh one: migrations run
under a write lock taken up front (BEGIN IMMEDIATE) and re-read what is applied once they hold it.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptchat.core.errors import GptchatError, UsageError
from gptchat.core.outputs import check_target, replace_atomic
from gptchat.core.paths import get_paths, private_dir, private_file


class StoreError(GptchatError):
    """The history database cannot be opened or written."""


MIGRATIONS: list[tuple[str, str]] = [
    (
        "m001_initial",
        """
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL DEFAULT 'chat',     -- chat | compare
            created REAL NOT NULL,
            updated REAL NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}'         -- JSON: settings at creation, compare panes
        );
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,                     -- user | assistant
            content TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'done',    -- done | streaming | stopped | error
            created REAL NOT NULL,
            pane INTEGER,                           -- compare: which pane the reply belongs to
            model TEXT,
            checkpoint_hash TEXT,
            template TEXT,
            options TEXT,                           -- JSON: sampling, max_new_tokens, shots, examples file, device, dtype
            examples_used TEXT,                     -- JSON list of example ids
            seed INTEGER,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            finish_reason TEXT,
            timings TEXT                            -- JSON: prefill_s, decode_s, tokens_per_s, load_s
        );
        CREATE INDEX messages_conversation ON messages(conversation_id, id);
        """,
    ),
    (
        "m002_messages_fts",
        """
        CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='rowid');
        CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
        END;
        CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
        END;
        CREATE TRIGGER messages_au AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
        END;
        """,
    ),
]

_JSON_COLUMNS = ("options", "examples_used", "timings")
BUSY_TIMEOUT_S = 30.0
_last_ms = 0
_id_lock = threading.Lock()


def new_id() -> str:
    """A time-sortable id: 12 hex digits of milliseconds (strictly increasing here) + 8 random."""
    global _last_ms
    with _id_lock:
        ms = max(int(time.time() * 1000), _last_ms + 1)
        _last_ms = ms
    return f"{ms:012x}{os.urandom(4).hex()}"


@dataclass
class Message:
    id: str
    conversation_id: str
    role: str
    content: str
    status: str = "done"
    created: float = 0.0
    pane: int | None = None
    model: str | None = None
    checkpoint_hash: str | None = None
    template: str | None = None
    options: dict | None = None
    examples_used: list | None = None
    seed: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    timings: dict | None = None


@dataclass
class Conversation:
    id: str
    name: str
    kind: str
    created: float
    updated: float
    meta: dict = field(default_factory=dict)
    n_messages: int = 0


class Store:
    """One SQLite file; safe to use from the UI thread and worker threads (one lock, autocommit)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        private_dir(self.path.parent)
        private_file(self.path)  # 0600 before SQLite writes a byte; SQLite gives -wal/-shm the same mode
        for side in ("-wal", "-shm"):  # left 0644 by older versions
            if (f := self.path.with_name(self.path.name + side)).exists():
                private_file(f)
        try:
            # timeout: how long to wait for another process's write lock (a migration, a long write)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            self.db.row_factory = sqlite3.Row
            self._wal()
            self.db.execute("PRAGMA foreign_keys=ON")
            self.migrate()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the history database {self.path}: {e}") from None

    def _wal(self) -> None:
        """Switch to WAL. Switching needs an exclusive lock, and SQLite can refuse it at once (no busy
        handler) while other processes open the same fresh file: retry until the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @classmethod
    def open_default(cls) -> "Store":
        return cls(get_paths().history_db)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- migrations ---------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply every migration not yet recorded, in order; returns the names applied.

        The write lock is taken first (BEGIN IMMEDIATE waits for it up to the busy timeout) and the
        applied list is read under it, so two processes opening a fresh database never both run a
        migration: the second finds it recorded.
        """
        with self._lock:
            if set(self._applied()) >= {name for name, _ in MIGRATIONS}:
                return []  # the common case: nothing to do, no write lock taken
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
                done = set(self._applied())
                applied = []
                for name, sql in MIGRATIONS:
                    if name in done:
                        continue
                    for stmt in _statements(sql):
                        self.db.execute(stmt)
                    self.db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
                    applied.append(name)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return applied

    def _applied(self) -> list[str]:
        try:
            return [r[0] for r in self.db.execute("SELECT name FROM _migrations ORDER BY name")]
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []  # a fresh database
            raise

    def migrations(self) -> list[str]:
        with self._lock:
            return self._applied()

    # -- conversations ------------------------------------------------------------------------

    def new_conversation(self, name: str = "", kind: str = "chat", meta: dict | None = None) -> Conversation:
        now = time.time()
        c = Conversation(new_id(), name, kind, now, now, meta or {})
        with self._lock:
            self.db.execute(
                "INSERT INTO conversations (id, name, kind, created, updated, meta) VALUES (?, ?, ?, ?, ?, ?)",
                (c.id, c.name, c.kind, c.created, c.updated, json.dumps(c.meta)),
            )
        return c

    def conversation(self, conv_id: str) -> Conversation | None:
        with self._lock:
            r = self.db.execute(_CONV_SELECT + " WHERE c.id = ? GROUP BY c.id", (conv_id,)).fetchone()
        return _conv(r) if r else None

    def conversations(self, search: str | None = None, limit: int = 500) -> list[Conversation]:
        """Newest first; with ``search``, only those with a message matching it (FTS5, prefix match)."""
        with self._lock:
            if search and search.strip():
                rows = self.db.execute(
                    _CONV_SELECT + " WHERE c.id IN (SELECT m2.conversation_id FROM messages m2 JOIN messages_fts f "
                    "ON f.rowid = m2.rowid WHERE messages_fts MATCH ?) OR c.name LIKE ? "
                    "GROUP BY c.id ORDER BY c.updated DESC LIMIT ?",
                    (fts_query(search), f"%{search.strip()}%", limit),
                ).fetchall()
            else:
                rows = self.db.execute(_CONV_SELECT + " GROUP BY c.id ORDER BY c.updated DESC LIMIT ?", (limit,)).fetchall()
        return [_conv(r) for r in rows]

    def rename(self, conv_id: str, name: str) -> None:
        with self._lock:
            self.db.execute("UPDATE conversations SET name = ?, updated = ? WHERE id = ?", (name, time.time(), conv_id))

    def delete(self, conv_id: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conv_id,))
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))

    def touch(self, conv_id: str) -> None:
        with self._lock:
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conv_id))

    # -- messages -----------------------------------------------------------------------------

    def add_message(self, conv_id: str, role: str, content: str, status: str = "done", **prov) -> Message:
        m = Message(new_id(), conv_id, role, content, status, time.time(), **prov)
        cols = _message_row(m)
        with self._lock:
            self.db.execute(
                f"INSERT INTO messages ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", tuple(cols.values())
            )
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (m.created, conv_id))
            if role == "user":  # name an unnamed conversation after its first question
                self.db.execute(
                    "UPDATE conversations SET name = ? WHERE id = ? AND name = ''", (_title(content), conv_id)
                )
        return m

    def update_message(self, msg_id: str, **fields) -> None:
        if not fields:
            return
        bad = [k for k in fields if k not in Message.__dataclass_fields__ or k in ("id", "conversation_id")]
        if bad:
            raise ValueError(f"unknown message fields: {bad}")
        vals = [json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        with self._lock:
            self.db.execute(
                f"UPDATE messages SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*vals, msg_id)
            )

    def delete_message(self, msg_id: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM messages WHERE id = ?", (msg_id,))

    def messages(self, conv_id: str) -> list[Message]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conv_id,)).fetchall()
        return [_message(r) for r in rows]

    def search_messages(self, query: str, limit: int = 100) -> list[Message]:
        with self._lock:
            rows = self.db.execute(
                "SELECT m.* FROM messages m JOIN messages_fts f ON f.rowid = m.rowid WHERE messages_fts MATCH ? "
                "ORDER BY rank LIMIT ?",
                (fts_query(query), limit),
            ).fetchall()
        return [_message(r) for r in rows]

    # -- export -------------------------------------------------------------------------------

    def export_json(self, conv_id: str) -> dict:
        c = self.conversation(conv_id)
        if c is None:
            raise StoreError(f"no conversation {conv_id}")
        return {"conversation": asdict(c), "messages": [asdict(m) for m in self.messages(conv_id)]}

    def export_markdown(self, conv_id: str) -> str:
        c = self.conversation(conv_id)
        if c is None:
            raise StoreError(f"no conversation {conv_id}")
        out = [f"# {c.name or 'Untitled conversation'}", "", f"*{c.kind}, started {_when(c.created)}*", ""]
        for m in self.messages(conv_id):
            who = "User" if m.role == "user" else "Assistant" + (f" (pane {m.pane + 1})" if m.pane is not None else "")
            out += [f"## {who}", "", m.content.strip() or "*(empty)*", ""]
            if m.role == "assistant":
                prov = [f"model `{m.model}`"] if m.model else []
                if m.template:
                    prov.append(f"template `{m.template}`")
                if m.seed is not None:
                    prov.append(f"seed {m.seed}")
                if m.completion_tokens is not None:
                    prov.append(f"{m.completion_tokens} tokens")
                if m.timings and m.timings.get("tokens_per_s"):
                    prov.append(f"{m.timings['tokens_per_s']:.1f} tok/s")
                prov.append(m.finish_reason or m.status)
                if m.options:
                    prov.append("options " + json.dumps(m.options, sort_keys=True))
                out += [f"> {', '.join(prov)}", ""]
        return "\n".join(out)


_CONV_SELECT = (
    "SELECT c.id, c.name, c.kind, c.created, c.updated, c.meta, COUNT(m.id) AS n "
    "FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id"
)


def fts_query(text: str) -> str:
    """Words typed by a person -> an FTS5 query: every word must appear, as a prefix, quoted."""
    words = [w.replace('"', '""') for w in text.split()]
    return " ".join(f'"{w}"*' for w in words) or '""'


def _statements(sql: str) -> list[str]:
    """Split a migration script into statements (triggers keep their inner semicolons)."""
    out, buf = [], []
    for line in sql.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line.strip():
            continue
        buf.append(line)
        if line.endswith(";") and sqlite3.complete_statement("\n".join(buf)):
            out.append("\n".join(buf))
            buf = []
    if buf:
        out.append("\n".join(buf))
    return out


def _message_row(m: Message) -> dict:
    d = asdict(m)
    for k in _JSON_COLUMNS:
        if d[k] is not None:
            d[k] = json.dumps(d[k])
    return d


def _message(r: sqlite3.Row) -> Message:
    d = dict(r)
    for k in _JSON_COLUMNS:
        if d.get(k) is not None:
            d[k] = json.loads(d[k])
    return Message(**d)


def _conv(r: sqlite3.Row) -> Conversation:
    return Conversation(r["id"], r["name"], r["kind"], r["created"], r["updated"], json.loads(r["meta"] or "{}"), r["n"])


def _title(text: str, n: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 1] + "…"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def export_file(store: Store, conv_id: str, fmt: str | None = "md", path: str | Path | None = None) -> Path:
    """Write a conversation to ``path`` (default: <data>/exports/<name>-<id>.<fmt>) as Markdown or JSON (``fmt``
    None: from the path's suffix, .json for JSON, else Markdown). A path the user names is checked as every
    command's output is and replaced in one step (core/outputs.py): never a folder, never left half written."""
    if fmt is None:
        fmt = "json" if path is not None and str(path).lower().endswith(".json") else "md"
    fmt = {"markdown": "md", "md": "md", "json": "json"}.get(fmt.lower().lstrip("."))
    if fmt is None:
        raise UsageError("export formats are md (Markdown) and json")
    if path is None:  # under gptchat's data folder: as private as the history it copies
        c = store.conversation(conv_id)  # named after the conversation; the id keeps names apart
        slug = "-".join(re.findall(r"[A-Za-z0-9]+", c.name if c is not None else ""))[:48].lower()
        path = private_file(private_dir(get_paths().data / "exports") / f"{slug + '-' if slug else ''}{conv_id}.{fmt}")
    else:
        path = check_target(path, flag="export")
    text = store.export_markdown(conv_id) if fmt == "md" else json.dumps(store.export_json(conv_id), indent=2, ensure_ascii=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
    replace_atomic(path, lambda f: f.write((text + "\n").encode("utf-8")))
    return path
