"""Conversations, messages and settings in SQLite (stdlib sqlite3, WAL).

One file, `sol.db` in the user data directory. Messages form a tree: each
has a parent, so regenerating an answer or editing an earlier question adds
a sibling branch and the old one stays. A conversation remembers the leaf
of the branch the user was on. Every write is its own transaction, so a
completed message survives the process being killed.

One connection is shared by all threads behind a lock: the GUI thread lists
conversations while the generation thread adds messages.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import zlib
from pathlib import Path

from ..errors import SolError

# Each entry moves the schema one version forward; never edit one that has shipped.
MIGRATIONS = [
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT,
        system TEXT,
        leaf_id INTEGER,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        meta TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL
    );
    CREATE INDEX messages_conversation ON messages(conversation_id);
    CREATE INDEX messages_parent ON messages(parent_id);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # How each generated token of an answer was chosen, so "why this token?" works after a restart.
    # zlib-compressed JSON: a long answer's trace is tens of kB, read only when asked for.
    """
    CREATE TABLE token_traces (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        data BLOB NOT NULL
    );
    """,
    # Side-by-side comparisons (issue 30): each column's model, its lineage and answer (and the conversation
    # a chat comparison kept), and at most one vote: a column's label, "tie" or "both_bad".
    """
    CREATE TABLE comparisons (
        id INTEGER PRIMARY KEY,
        prompt TEXT NOT NULL,
        settings TEXT NOT NULL DEFAULT '{}',
        blind INTEGER NOT NULL DEFAULT 1,
        created REAL NOT NULL
    );
    CREATE TABLE comparison_answers (
        comparison_id INTEGER NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
        slot INTEGER NOT NULL,
        label TEXT NOT NULL,
        model TEXT NOT NULL,
        lineage TEXT NOT NULL DEFAULT '{}',
        conversation_id INTEGER REFERENCES conversations(id) ON DELETE SET NULL,
        text TEXT NOT NULL,
        PRIMARY KEY (comparison_id, slot)
    );
    CREATE TABLE votes (
        comparison_id INTEGER PRIMARY KEY REFERENCES comparisons(id) ON DELETE CASCADE,
        outcome TEXT NOT NULL,
        created REAL NOT NULL
    );
    """,
]

ROLES = ("system", "user", "assistant", "tool")
LABELS = "ABCD"                      # a comparison's columns
NOT_A_WINNER = ("tie", "both_bad")   # the votes that name no column
BUSY_TIMEOUT_S = 10


def _busy(e: Exception) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def _when_free(fn, seconds: float = BUSY_TIMEOUT_S):
    """Run fn, again while another process holds the lock: switching to WAL can answer "database is
    locked" at once, without waiting for the busy timeout."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def default_path() -> Path:
    from ..formats.registry import data_dir
    return data_dir() / "sol.db"


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = ":memory:" if path == ":memory:" else Path(path or default_path())
        self._lock = threading.RLock()
        if self.path != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=BUSY_TIMEOUT_S,
                                       isolation_level=None)   # we open transactions ourselves
            self._db.row_factory = sqlite3.Row
            _when_free(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            _when_free(self._migrate)
        except sqlite3.OperationalError as e:
            if _busy(e):
                raise SolError(f"{self.path}: the conversation database is busy (another Sol is writing it); "
                               "close the other Sol or try again") from None
            raise SolError(f"{self.path}: cannot open the conversation database ({e}); check that the file "
                           "and its folder can be read and written") from None
        except sqlite3.DatabaseError as e:
            raise SolError(f"{self.path}: cannot open the conversation database ({e}); move the file "
                           "aside and Sol will start a new one (it was not changed)") from None

    # ---- plumbing ---------------------------------------------------------------
    def _migrate(self) -> None:
        # One transaction from reading the version to writing the new one: several processes opening a
        # new file at once take turns (BEGIN IMMEDIATE waits for the busy timeout), and each one after the
        # first finds the schema already there.
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise SolError(f"{self.path}: written by a newer Sol (schema version {version}, this Sol knows "
                               f"{len(MIGRATIONS)}); update Sol to open it")
            for v in range(version, len(MIGRATIONS)):
                db.executescript_safe(MIGRATIONS[v])
            if version < len(MIGRATIONS):
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))

    def _tx(self):
        return _Transaction(self._db, self._lock, self.path)

    def _query(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @property
    def schema_version(self) -> int:
        return self._query("SELECT version FROM schema_version")[0][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- conversations ----------------------------------------------------------
    def create_conversation(self, title: str, model: str | None = None, system: str | None = None) -> int:
        now = time.time()
        with self._tx() as db:
            cur = db.execute("INSERT INTO conversations (title, model, system, created, updated) "
                             "VALUES (?, ?, ?, ?, ?)", (title or "New chat", model, system, now, now))
            return cur.lastrowid

    def conversation(self, conversation_id: int) -> dict:
        rows = self._query("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise SolError(f"conversation {conversation_id}: no such conversation in {self.path}")
        return dict(rows[0])

    def list_conversations(self, search: str | None = None) -> list[dict]:
        """Newest first: {"id","title","model","system","created","updated","messages"}."""
        sql = ("SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS messages "
               "FROM conversations c")
        args: tuple = ()
        if search:
            like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (" WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m WHERE "
                    "m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\')")
            args = (like, like)
        return [dict(r) for r in self._query(sql + " ORDER BY c.updated DESC, c.id DESC", args)]

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self._update_conversation(conversation_id, title=title)

    def set_system(self, conversation_id: int, system: str | None) -> None:
        self._update_conversation(conversation_id, system=system)

    def _update_conversation(self, conversation_id: int, **fields) -> None:
        self.conversation(conversation_id)   # names a missing id
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE conversations SET {sets}, updated = ? WHERE id = ?",
                       (*fields.values(), time.time(), conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete a conversation and all its messages. The GUI asks the user first."""
        with self._tx() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---- messages ---------------------------------------------------------------
    def add_message(self, conversation_id: int, role: str, content: str, parent_id: int | None = None,
                    prompt_tokens: int = 0, completion_tokens: int = 0, meta: dict | None = None,
                    tokens: list[dict] | None = None) -> int:
        """Append a message (committed before this returns) and make it the conversation's current leaf.
        `tokens`: an answer's token events (see chat.trace_entry), kept for `tokens(message_id)`."""
        if role not in ROLES:
            raise SolError(f"message role {role!r}: must be one of {', '.join(ROLES)}")
        now = time.time()
        with self._tx() as db:
            cur = db.execute("INSERT INTO messages (conversation_id, parent_id, role, content, prompt_tokens, "
                             "completion_tokens, meta, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (conversation_id, parent_id, role, content, int(prompt_tokens),
                              int(completion_tokens), json.dumps(meta or {}, ensure_ascii=False), now))
            db.execute("UPDATE conversations SET leaf_id = ?, updated = ? WHERE id = ?",
                       (cur.lastrowid, now, conversation_id))
            if tokens:
                data = zlib.compress(json.dumps(tokens, ensure_ascii=False, separators=(",", ":")).encode())
                db.execute("INSERT INTO token_traces (message_id, data) VALUES (?, ?)", (cur.lastrowid, data))
            return cur.lastrowid

    def tokens(self, message_id: int) -> list[dict]:
        """The token events stored with an answer; [] for older answers, or a trace that cannot be read."""
        rows = self._query("SELECT data FROM token_traces WHERE message_id = ?", (message_id,))
        if not rows:
            return []
        try:
            out = json.loads(zlib.decompress(rows[0]["data"]))
        except (zlib.error, ValueError):
            return []     # a damaged trace costs the explanation, never the conversation
        return out if isinstance(out, list) else []

    def message(self, message_id: int) -> dict:
        rows = self._query("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise SolError(f"message {message_id}: no such message in {self.path}")
        return _message(rows[0])

    def messages(self, conversation_id: int, leaf_id: int | None = None) -> list[dict]:
        """The branch ending at `leaf_id` (default: the conversation's current leaf), root first."""
        if leaf_id is None:
            leaf_id = self.conversation(conversation_id)["leaf_id"]
        if leaf_id is None:
            return []
        rows = self._query(
            "WITH RECURSIVE branch(id) AS (SELECT ? UNION ALL SELECT m.parent_id FROM messages m "
            "JOIN branch b ON m.id = b.id WHERE m.parent_id IS NOT NULL) "
            "SELECT m.* FROM messages m JOIN branch b ON m.id = b.id WHERE m.conversation_id = ? ORDER BY m.id",
            (leaf_id, conversation_id))
        return [_message(r) for r in rows]

    def all_messages(self, conversation_id: int) -> list[dict]:
        """Every message of every branch, oldest first."""
        rows = self._query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(r) for r in rows]

    def children(self, message_id: int | None, conversation_id: int | None = None) -> list[dict]:
        """Messages answering `message_id` (several when it was regenerated or edited), oldest first.
        `message_id=None` gives the roots of `conversation_id`."""
        if message_id is None:
            rows = self._query("SELECT * FROM messages WHERE conversation_id = ? AND parent_id IS NULL "
                               "ORDER BY id", (conversation_id,))
        else:
            rows = self._query("SELECT * FROM messages WHERE parent_id = ? ORDER BY id", (message_id,))
        return [_message(r) for r in rows]

    def siblings(self, message_id: int) -> list[dict]:
        """The alternatives to a message (itself included), oldest first: the GUI's "< 2/3 >"."""
        m = self.message(message_id)
        return self.children(m["parent_id"], m["conversation_id"])

    def newest_leaf(self, message_id: int) -> int:
        """Follow the newest child down from a message to the end of its branch."""
        while True:
            kids = self.children(message_id)
            if not kids:
                return message_id
            message_id = kids[-1]["id"]

    def switch_branch(self, message_id: int) -> list[dict]:
        """Make the branch through `message_id` current (its newest continuation); returns that branch."""
        m = self.message(message_id)
        leaf = self.newest_leaf(message_id)
        with self._tx() as db:
            db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, m["conversation_id"]))
        return self.messages(m["conversation_id"], leaf)

    def set_leaf(self, conversation_id: int, leaf_id: int | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf_id, conversation_id))

    # ---- settings -----------------------------------------------------------------
    def get_setting(self, key: str, default=None):
        rows = self._query("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_setting(self, key: str, value) -> None:
        """Any JSON-able value. Plugins keep their own state under keys "plugin.<name>.<key>"."""
        with self._tx() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = excluded.value", (key, json.dumps(value, ensure_ascii=False)))

    # ---- comparisons and blind votes ------------------------------------------------------
    def add_comparison(self, prompt: str, answers: list[dict], settings: dict | None = None,
                       blind: bool = True) -> int:
        """Keep a comparison: `answers` in the order the columns show them (labelled A, B, ...), each
        {"model": name, "text", "lineage": dict (optional), "conversation_id": int (optional)}."""
        if not 2 <= len(answers) <= len(LABELS):
            raise SolError(f"a comparison has 2 to {len(LABELS)} answers, not {len(answers)}")
        now = time.time()
        with self._tx() as db:
            cid = db.execute("INSERT INTO comparisons (prompt, settings, blind, created) VALUES (?, ?, ?, ?)",
                             (prompt, json.dumps(settings or {}, ensure_ascii=False), int(blind), now)).lastrowid
            for slot, a in enumerate(answers):
                db.execute("INSERT INTO comparison_answers (comparison_id, slot, label, model, lineage, "
                           "conversation_id, text) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (cid, slot, LABELS[slot], str(a["model"]),
                            json.dumps(a.get("lineage") or {}, ensure_ascii=False), a.get("conversation_id"),
                            str(a.get("text", ""))))
            return cid

    def vote(self, comparison_id: int, outcome: str) -> dict:
        """Record the vote (a column's label, "tie" or "both_bad"; once per comparison) and return the
        comparison with its models revealed."""
        c = self.comparison(comparison_id, reveal=True)
        labels = [a["label"] for a in c["answers"]]
        if outcome not in labels and outcome not in NOT_A_WINNER:
            raise SolError(f"vote {outcome!r}: must be one of {', '.join(labels + list(NOT_A_WINNER))}")
        if c["vote"] is not None:
            raise SolError(f"comparison {comparison_id}: already voted ({c['vote']})")
        with self._tx() as db:
            db.execute("INSERT INTO votes (comparison_id, outcome, created) VALUES (?, ?, ?)",
                       (comparison_id, outcome, time.time()))
        return {**c, "vote": outcome}

    def comparison(self, comparison_id: int, reveal: bool | None = None) -> dict:
        """{"id", "prompt", "settings", "blind", "created", "vote", "answers": [{"slot", "label", "model",
        "lineage", "conversation_id", "text"}]}. A blind comparison not yet voted on hides each answer's
        model and lineage (None) unless `reveal`."""
        rows = self._query("SELECT c.*, v.outcome AS vote FROM comparisons c LEFT JOIN votes v "
                           "ON v.comparison_id = c.id WHERE c.id = ?", (comparison_id,))
        if not rows:
            raise SolError(f"comparison {comparison_id}: no such comparison in {self.path}")
        c = dict(rows[0])
        c["settings"], c["blind"] = json.loads(c["settings"] or "{}"), bool(c["blind"])
        hide = c["blind"] and c["vote"] is None and not reveal
        c["answers"] = []
        for r in self._query("SELECT * FROM comparison_answers WHERE comparison_id = ? ORDER BY slot",
                             (comparison_id,)):
            a = {k: r[k] for k in ("slot", "label", "model", "conversation_id", "text")}
            a["lineage"] = json.loads(r["lineage"] or "{}")
            if hide:
                a["model"] = a["lineage"] = None
            c["answers"].append(a)
        return c

    def comparisons(self) -> list[dict]:
        """Every comparison, newest first (as comparison())."""
        return [self.comparison(r["id"]) for r in self._query("SELECT id FROM comparisons ORDER BY id DESC")]

    def battles(self) -> list[tuple[str, str, str]]:
        """The votes as pairwise results, oldest first: (model a, model b, "a" | "b" | "tie" | "both_bad").
        A column that won beat each other column; a tie or "both bad" holds for every pair; pairs the vote
        says nothing about (two losers of three) are left out."""
        out = []
        rows = self._query("SELECT v.outcome, a.comparison_id, a.label, a.model FROM votes v "
                           "JOIN comparison_answers a ON a.comparison_id = v.comparison_id "
                           "ORDER BY v.created, v.comparison_id, a.slot")
        by_comparison: dict[int, tuple[str, list]] = {}
        for r in rows:
            by_comparison.setdefault(r["comparison_id"], (r["outcome"], []))[1].append((r["label"], r["model"]))
        for outcome, cols in by_comparison.values():
            for i in range(len(cols)):
                for j in range(i + 1, len(cols)):
                    (la, ma), (lb, mb) = cols[i], cols[j]
                    if outcome in NOT_A_WINNER:
                        out.append((ma, mb, outcome))
                    elif outcome in (la, lb):
                        out.append((ma, mb, "a" if outcome == la else "b"))
        return out

    # ---- export ---------------------------------------------------------------------
    def export_json(self, conversation_id: int) -> str:
        """The conversation as JSON: its current branch in "messages", every branch in "tree"."""
        c = self.conversation(conversation_id)
        doc = {"id": c["id"], "title": c["title"], "model": c["model"], "system": c["system"],
               "created": c["created"], "updated": c["updated"],
               "messages": self.messages(conversation_id), "tree": self.all_messages(conversation_id)}
        return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"

    def export_markdown(self, conversation_id: int) -> str:
        """The current branch as Markdown, with token counts per message (the book's Box 4)."""
        c = self.conversation(conversation_id)
        out = [f"# {c['title']}", ""]
        if c["model"]:
            out += [f"Model: `{c['model']}`", ""]
        if c["system"]:
            out += ["## System", "", c["system"], ""]
        for m in self.messages(conversation_id):
            out += [f"## {m['role'].capitalize()}", "", m["content"], ""]
            if m["completion_tokens"]:
                out += [f"*{m['prompt_tokens']} prompt tokens, {m['completion_tokens']} completion tokens*", ""]
            elif m["prompt_tokens"]:
                out += [f"*{m['prompt_tokens']} tokens*", ""]
        return "\n".join(out)


def _message(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["meta"] = json.loads(d["meta"] or "{}")
    return d


class _Transaction:
    """`with store._tx() as db:` — BEGIN IMMEDIATE under the lock, COMMIT on success, ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection, lock, path=None):
        self.db, self.lock, self.path = db, lock, path

    def __enter__(self):
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            self.lock.release()
            self._read_only(e)
            raise
        except BaseException:
            self.lock.release()
            raise
        return self

    def _read_only(self, e: BaseException) -> None:
        """A database Sol may read but not write (file mode, a read-only folder or disk): say so, naming it."""
        if isinstance(e, sqlite3.OperationalError) and "readonly" in str(e):
            raise SolError(f"{self.path}: the conversation database cannot be written ({e}); make the file "
                           "and its folder writable, or set SOL_HOME to a folder you can write") from None

    def execute(self, sql, args=()):
        return self.db.execute(sql, args)

    def executescript_safe(self, script: str) -> None:
        # executescript() would COMMIT our transaction first; run the statements one by one instead.
        for stmt in script.split(";"):
            if stmt.strip():
                self.db.execute(stmt)

    def __exit__(self, exc_type, exc, tb):
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
        self._read_only(exc)
        return False


def open_or_fresh(path: str | Path | None = None) -> tuple[Store, str | None]:
    """The store, or, when its file cannot be opened, a fresh database beside it, so new chats are still
    kept on disk; the damaged file is left exactly as it was. Returns (store, a message saying so or None)."""
    path = Path(path or default_path())
    try:
        return Store(path), None
    except SolError as e:
        problem = str(e)
    for n in range(1, 100):
        fresh = path.with_name(f"{path.stem}-new{'' if n == 1 else f'-{n}'}{path.suffix}")
        try:
            store = Store(fresh)
        except SolError:
            continue   # that one is damaged too: leave it, try the next name
        return store, (f"The conversation database could not be opened and was left untouched: {problem}. "
                       f"New chats are kept in {fresh}.")
    raise SolError(f"{path}: cannot open the conversation database, nor a new one beside it ({problem})")
