"""The store: conversations with branches, settings, migrations, export, and durability under SIGKILL."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from sol.core.chat.store import MIGRATIONS, Store
from sol.core.errors import SolError


def test_default_file_is_in_the_data_dir_and_uses_wal(isolated_home):
    s = Store()
    assert s.path == isolated_home / "sol.db" and s.path.is_file()
    assert s._query("PRAGMA journal_mode")[0][0] == "wal"
    assert s.schema_version == len(MIGRATIONS)


def test_conversations_messages_and_branches():
    s = Store(":memory:")
    c = s.create_conversation("Times tables", model="tiny", system="Be brief.")
    u = s.add_message(c, "user", "what is 12*7?", prompt_tokens=6)
    a1 = s.add_message(c, "assistant", "84", parent_id=u, prompt_tokens=10, completion_tokens=2)
    assert [m["id"] for m in s.messages(c)] == [u, a1]
    a2 = s.add_message(c, "assistant", "It is 84.", parent_id=u, completion_tokens=5, meta={"seed": 1})
    # the new answer is current; the old one is still there as a sibling
    assert [m["content"] for m in s.messages(c)] == ["what is 12*7?", "It is 84."]
    assert [m["id"] for m in s.siblings(a2)] == [a1, a2]
    assert [m["id"] for m in s.children(u)] == [a1, a2]
    assert s.messages(c)[-1]["meta"] == {"seed": 1}
    assert [m["id"] for m in s.messages(c, leaf_id=a1)] == [u, a1]
    s.switch_branch(a1)
    assert s.messages(c)[-1]["id"] == a1
    assert s.newest_leaf(u) == a2
    row = s.list_conversations()[0]
    assert (row["title"], row["model"], row["system"], row["messages"]) == ("Times tables", "tiny", "Be brief.", 3)
    s.rename_conversation(c, "Arithmetic")
    assert s.conversation(c)["title"] == "Arithmetic"
    with pytest.raises(SolError, match="role"):
        s.add_message(c, "robot", "hi")


def test_search_finds_titles_and_message_text_and_escapes_wildcards():
    s = Store(":memory:")
    a = s.create_conversation("Cooking")
    s.add_message(a, "user", "how long to boil an egg?")
    b = s.create_conversation("Maths 100%")
    assert [c["id"] for c in s.list_conversations("egg")] == [a]
    assert [c["id"] for c in s.list_conversations("100%")] == [b]
    assert s.list_conversations("%") == [s.conversation(b) | {"messages": 0}]
    s.delete_conversation(a)
    assert [c["id"] for c in s.list_conversations()] == [b]
    assert s.all_messages(a) == []


def test_settings_roundtrip_any_json_value(tmp_path):
    s = Store(tmp_path / "x.db")
    assert s.get_setting("theme", "dark") == "dark"
    s.set_setting("theme", "light")
    s.set_setting("plugin.calculator.history", [1, 2, {"a": None}])
    s.close()
    s = Store(tmp_path / "x.db")
    assert s.get_setting("theme") == "light"
    assert s.get_setting("plugin.calculator.history") == [1, 2, {"a": None}]


def test_export_markdown_and_json():
    s = Store(":memory:")
    c = s.create_conversation("Times", model="tiny", system="Be brief.")
    u = s.add_message(c, "user", "12*7?", prompt_tokens=4)
    old = s.add_message(c, "assistant", "85", parent_id=u, prompt_tokens=9, completion_tokens=1)
    s.add_message(c, "assistant", "84", parent_id=u, prompt_tokens=9, completion_tokens=1)
    md = s.export_markdown(c)
    assert md.startswith("# Times\n") and "## System\n\nBe brief." in md
    assert "## User\n\n12*7?" in md and "## Assistant\n\n84" in md and "85" not in md
    assert "9 prompt tokens, 1 completion tokens" in md
    doc = json.loads(s.export_json(c))
    assert [m["content"] for m in doc["messages"]] == ["12*7?", "84"]
    assert old in [m["id"] for m in doc["tree"]] and doc["system"] == "Be brief."


def test_migrates_an_unversioned_file_and_refuses_a_newer_one(tmp_path):
    p = tmp_path / "old.db"
    sqlite3.connect(p).close()                 # an empty file from before the schema existed
    assert Store(p).schema_version == len(MIGRATIONS)
    db = sqlite3.connect(p)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(SolError, match="newer Sol"):
        Store(p)


def test_a_file_that_is_not_a_database_is_named_and_left_alone(tmp_path):
    p = tmp_path / "sol.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SolError, match=str(p)):
        Store(p)
    assert p.read_bytes() == b"this is not sqlite" * 100


def test_writes_from_several_threads():
    s = Store(":memory:")
    c = s.create_conversation("threads")

    def write(k):
        for i in range(50):
            s.add_message(c, "user", f"{k}-{i}")
    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(s.all_messages(c)) == 200


WRITER = """
import sys, time
from sol.core.chat.store import Store
s = Store(sys.argv[1])
c = s.create_conversation("killed")
parent = None
i = 0
while True:
    parent = s.add_message(c, "user" if i % 2 == 0 else "assistant", f"message {i}", parent_id=parent)
    print(i, flush=True)
    i += 1
    time.sleep(0.002)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_every_completed_message_survives_sigkill(tmp_path):
    path = tmp_path / "sol.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        reported = -1
        for line in proc.stdout:          # a number is printed only after its message was committed
            reported = int(line)
            if reported >= 40:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    s = Store(path)
    (conv,) = s.list_conversations()
    contents = [m["content"] for m in s.messages(conv["id"])]
    assert len(contents) >= reported + 1
    assert contents[:reported + 1] == [f"message {i}" for i in range(reported + 1)]


def test_an_answers_token_trace_is_kept_compressed_and_goes_with_its_conversation():
    s = Store(":memory:")
    c = s.create_conversation("t")
    u = s.add_message(c, "user", "hi")
    trace = [{"text": "h", "id": 7, "logprob": -0.1, "top": [{"id": 7, "text": "h", "prob": 0.9}],
              "explanation": {"ids": [7, 8], "probs": [0.9, 0.1], "cumulative": [0.9, 1.0], "draw": 0.3,
                              "index": 0}}] * 50
    a = s.add_message(c, "assistant", "h" * 50, parent_id=u, tokens=trace)
    assert s.tokens(a) == trace and s.tokens(u) == []
    stored = s._query("SELECT length(data) AS n FROM token_traces WHERE message_id = ?", (a,))[0]["n"]
    assert stored < len(json.dumps(trace)) / 10
    with s._tx() as db:                       # a damaged trace costs the explanation, not the chat
        db.execute("UPDATE token_traces SET data = ? WHERE message_id = ?", (b"not zlib", a))
    assert s.tokens(a) == [] and s.messages(c)[-1]["id"] == a
    s.delete_conversation(c)
    assert s._query("SELECT count(*) AS n FROM token_traces")[0]["n"] == 0


def test_a_version_1_database_gains_the_token_traces_table(tmp_path):
    p = tmp_path / "old.db"
    db = sqlite3.connect(p)
    db.executescript(MIGRATIONS[0])
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('kept', 0, 0)")
    db.commit()
    db.close()
    s = Store(p)
    assert s.schema_version == len(MIGRATIONS) == 3
    assert [r["title"] for r in s.list_conversations()] == ["kept"]
    a = s.add_message(1, "assistant", "x", tokens=[{"text": "x", "id": 1, "logprob": 0.0, "top": []}])
    assert s.tokens(a)[0]["id"] == 1
