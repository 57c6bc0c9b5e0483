"""The chat loop: tool calls with forced results, branches, context overflow, the store, `sol chat`."""
import json
import sys
import textwrap
import threading

import pytest
from conftest import make_tiny_model

import sol.core.generation.engine as engine_mod
from sol.core.chat.session import MAX_TOOL_ROUNDS, ChatSession, parse_json_call, parse_sol_call
from sol.core.chat.store import Store
from sol.core.cli import main
from sol.core.formats.checkpoint import load_model
from sol.core.generation.engine import GenerationParams
from sol.core.generation.sampling import SamplingParams
from sol.core.plugins.manager import PluginManager

EVENT_KEYS = {
    "token": {"type", "text", "id", "logprob", "top", "explanation", "forced"},
    "message": {"type", "role", "content", "prompt_tokens", "completion_tokens", "id", "tokens_per_s",
                "time_to_first_token_s"},
    "tool_call": {"type", "name", "arguments"},
    "notice": {"type", "text"},
    "error": {"type", "message"},
}


@pytest.fixture
def lm(tiny_model):
    return load_model(tiny_model)


def script(monkeypatch, tokenizer, *texts):
    """Make the model 'choose' exactly these texts' tokens, then end its turn."""
    ids = [i for t in texts for i in tokenizer.encode_ids(t, add_special_tokens=False)]
    it = iter(ids)
    end = tokenizer.token_to_id("<|end|>")
    monkeypatch.setattr(engine_mod, "choose", lambda logits, p, g, h=None, explain=True: (next(it, end), None))


class CountingPlugins(PluginManager):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls, self.events = [], []

    def call_tool(self, name, arguments, **kw):
        self.calls.append((name, arguments))
        return super().call_tool(name, arguments, **kw)

    def chat_event(self, event):
        self.events.append(event)
        super().chat_event(event)


def params(n=60):
    return GenerationParams(max_tokens=n, sampling=SamplingParams(temperature=0))


def test_sol_tool_call_runs_once_forces_the_result_and_continues(lm, monkeypatch):
    tok = lm.tokenizer
    script(monkeypatch, tok, "Let me see.<|tool_call|>calculator: 12*7<|tool_end|>", "It is 84.")
    pm = CountingPlugins()
    chat = ChatSession(lm, pm, system="You can use a calculator.")
    events = list(chat.send("what is 12 times 7?", params()))
    for e in events:
        assert set(e) >= EVENT_KEYS.get(e["type"], {"type"}), e
    assert pm.calls == [("calculator", {"expression": "12*7"})]
    assert pm.events == events                                # every event also went to the plugins
    kinds = [e["type"] for e in events if e["type"] != "token"]
    assert kinds == ["message", "message", "tool_call", "tool_result", "message", "message"]
    assert next(e for e in events if e["type"] == "tool_result") == {"type": "tool_result", "name": "calculator",
                                                                      "result": "84"}
    tokens = [e for e in events if e["type"] == "token"]
    forced = [e for e in tokens if e["forced"]]
    assert "".join(e["text"] for e in forced) == "<|tool_result|>84<|tool_end|>"
    assert all(e["logprob"] is not None for e in tokens)
    # sampled tokens before and after the forced block, none of them flagged
    first_forced = tokens.index(forced[0])
    assert "".join(e["text"] for e in tokens[:first_forced]) == "Let me see.<|tool_call|>calculator: 12*7<|tool_end|>"
    assert "".join(e["text"] for e in tokens[first_forced + len(forced):]) == "It is 84."
    assert not any(e["forced"] for e in tokens[first_forced + len(forced):])
    # the model really read the result: the forced ids sit in its sequence right after the call
    result_ids = tok.encode_ids("<|tool_result|>84<|tool_end|>", add_special_tokens=False)
    seq = chat._session.ids
    assert any(seq[i:i + len(result_ids)] == result_ids for i in range(len(seq)))
    roles = [(m["role"], m["content"]) for m in chat.messages]
    assert roles == [("user", "what is 12 times 7?"),
                     ("assistant", "Let me see.<|tool_call|>calculator: 12*7<|tool_end|>"),
                     ("tool", "84"), ("assistant", "It is 84.")]
    final = [e for e in events if e["type"] == "message"][-1]
    assert final["completion_tokens"] == len(tok.encode_ids("It is 84.", add_special_tokens=False))
    assert final["prompt_tokens"] > events[0]["prompt_tokens"] > 0
    # rendering the stored messages gives back exactly the sequence the model saw
    rendered = tok.encode_ids(chat._render(chat.messages, add_generation_prompt=False), add_special_tokens=False)
    assert rendered[:len(seq)] == seq


def test_json_tool_call_of_an_imported_model_goes_back_through_its_template(tmp_path, monkeypatch):
    tiny_model = make_tiny_model(tmp_path / "imported", context=512)   # room for a JSON call, char by char
    template = textwrap.dedent("""\
        {%- for m in messages %}
        {%- if m.role == 'assistant' %}<|im_start|>assistant
        {{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>
        {{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
        </tool_call>{% endfor %}<|im_end|>
        {% elif m.role == 'tool' %}<|im_start|>user
        <tool_response>
        {{ m.content }}
        </tool_response><|im_end|>
        {% else %}<|im_start|>{{ m.role }}
        {{ m.content }}<|im_end|>
        {% endif %}
        {%- endfor %}
        {%- if add_generation_prompt %}<|im_start|>assistant
        {% endif %}""")
    (tiny_model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template,
                                                                  "eos_token": "<|endoftext|>"}))
    lm = load_model(tiny_model)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    script(monkeypatch, lm.tokenizer, call, "42<|endoftext|>")
    pm = CountingPlugins()
    chat = ChatSession(lm, pm)
    events = list(chat.send("six times seven?", params(300)))
    assert pm.calls == [("calculator", {"expression": "6*7"})], [e for e in events if e["type"] != "token"]
    forced = "".join(e["text"] for e in events if e["type"] == "token" and e["forced"])
    assert forced == "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n" \
                     "<|im_start|>assistant\n"
    assert [m["content"] for m in chat.messages][-1] == "42"
    assert chat.messages[1]["meta"]["tool_call"] == {"name": "calculator", "arguments": {"expression": "6*7"},
                                                     "style": "json"}
    seq = chat._session.ids
    rendered = lm.tokenizer.encode_ids(chat._render(chat.messages[:3]), add_special_tokens=False)
    assert seq[:len(rendered)] == rendered    # the template renders the stored call as the model saw it


def test_a_tool_error_goes_back_to_the_model(lm, monkeypatch):
    script(monkeypatch, lm.tokenizer, "<|tool_call|>calculator: 1/0<|tool_end|>", "Oops.",)
    events = list(ChatSession(lm, PluginManager()).send("1/0?", params()))
    assert {"type": "tool_result", "name": "calculator", "error": "division by zero"} in events
    forced = "".join(e["text"] for e in events if e["type"] == "token" and e["forced"])
    assert forced == "<|tool_result|>error: division by zero<|tool_end|>"


def test_at_most_five_tool_rounds_per_turn(lm, monkeypatch):
    script(monkeypatch, lm.tokenizer, *["<|tool_call|>calculator: 1+1<|tool_end|>"] * 10)
    pm = CountingPlugins()
    events = list(ChatSession(lm, pm).send("loop", params(400)))
    assert len(pm.calls) == MAX_TOOL_ROUNDS
    assert events[-1]["type"] == "notice" and "more than 5 tool calls" in events[-1]["text"]


WORKING_AND_BROKEN = {
    "chat_bad_import": "raise ImportError('missing dependency: numpy2')\n",
    "chat_bad_hook": "from sol.core.plugins.hooks import hookimpl\n@hookimpl\ndef sol_tools():\n    raise RuntimeError('x')\n",
    "chat_bad_observer": "from sol.core.plugins.hooks import hookimpl\n@hookimpl\ndef sol_chat_event(event):\n    1/0\n",
}


def test_chat_still_works_with_broken_plugins(lm, monkeypatch, tmp_path):
    for name, src in WORKING_AND_BROKEN.items():
        (tmp_path / f"{name}.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = PluginManager(extra_modules=list(WORKING_AND_BROKEN))
    script(monkeypatch, lm.tokenizer, "<|tool_call|>calculator: 2**10<|tool_end|>", "1024.")
    events = list(ChatSession(lm, pm).send("2 to the 10th?", params()))
    assert {"type": "tool_result", "name": "calculator", "result": "1024"} in events
    assert events[-1]["type"] == "message" and events[-1]["content"] == "1024."
    status = {p.name: (p.status, p.error) for p in pm.plugins()}
    assert status["chat_bad_import"] == ("broken", "import failed: ImportError: missing dependency: numpy2")
    assert status["chat_bad_hook"] == ("broken", "sol_tools raised RuntimeError: x")
    assert status["chat_bad_observer"] == ("broken", "sol_chat_event raised ZeroDivisionError: division by zero")
    for m in WORKING_AND_BROKEN:
        sys.modules.pop(m, None)


def test_regenerate_and_edit_keep_the_old_branches(lm):
    store = Store()
    chat = ChatSession(lm, store=store)
    p = GenerationParams(max_tokens=4, sampling=SamplingParams(temperature=1.0, seed=1))
    list(chat.send("Before we proceed", p))
    u1, a1 = chat.messages[0]["id"], chat.messages[1]["id"]
    events = list(chat.regenerate(p))
    a2 = chat.messages[-1]["id"]
    assert [m["id"] for m in chat.messages] == [u1, a2] and events[-1]["id"] == a2
    assert chat.branches(a2) == [a1, a2]
    events = list(chat.edit(u1, "Speak, speak.", p))
    u2 = chat.messages[0]["id"]
    assert events[0] == {**events[0], "type": "message", "role": "user", "content": "Speak, speak."}
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] and u2 != u1
    assert chat.branches(u2) == [u1, u2]
    assert len(store.all_messages(chat.conversation_id)) == 5       # u1 a1 a2 u2 a3: nothing thrown away
    old = chat.switch(a1)
    assert [m["id"] for m in old] == [u1, a1]
    # reopening the conversation from the store gives the branch the user was on
    again = ChatSession(lm, store=Store(), conversation_id=chat.conversation_id)
    assert [m["id"] for m in again.messages] == [u1, a1]
    bad = list(again.edit(a1, "x", p))
    assert bad == [{"type": "error", "message": f"message {a1}: only user messages can be edited (this one is "
                                                "assistant); regenerate an answer instead"}]
    assert list(ChatSession(lm).regenerate(p))[0]["type"] == "error"


def test_a_long_conversation_drops_its_oldest_turns_with_a_notice(lm):
    # tiny model: context 128 tokens; each turn below takes about 30
    chat = ChatSession(lm, system="Be brief.")
    p = GenerationParams(max_tokens=8, sampling=SamplingParams(temperature=1.0, seed=0))
    turns_before_notice = None
    for i in range(10):
        events = list(chat.send("Olá! Café, naïve, accents and emoji: 🌍 🌍", p))
        assert events[-1]["type"] == "message", events[-1]
        answer = [e for e in events if e["type"] == "message"][-1]
        assert answer["prompt_tokens"] <= 128 - 8           # room was left for the answer
        if any(e["type"] == "notice" for e in events):
            notice = next(e for e in events if e["type"] == "notice")
            assert "oldest" in notice["text"] and "context window (128 tokens)" in notice["text"]
            turns_before_notice = turns_before_notice or i
    assert turns_before_notice is not None and turns_before_notice >= 1
    assert len(chat.messages) == 20                              # the conversation itself keeps everything


def test_a_message_longer_than_the_context_is_an_error_event(lm):
    events = list(ChatSession(lm).send("Speak, speak. " * 100, params(8)))
    assert events[-1]["type"] == "error" and "context window is 128" in events[-1]["message"]


def test_cancel_keeps_what_was_generated(lm):
    cancel = threading.Event()
    cancel.set()
    events = list(ChatSession(lm).send("hello", params(20), cancel=cancel))
    assert events[-1]["type"] == "message" and events[-1]["completion_tokens"] == 0


@pytest.mark.parametrize("body,name,args", [
    ("calculator: 12*7", "calculator", {"expression": "12*7"}),
    ('calculator: {"expression": "2+2"}', "calculator", {"expression": "2+2"}),
    ("calculator:{not json", "calculator", {"expression": "{not json"}),
    ("weather: Lisbon", "weather", {"input": "Lisbon"}),
])
def test_parse_sol_call(body, name, args):
    tools = PluginManager().tools()
    call = parse_sol_call(body, tools)
    assert (call.name, call.arguments, call.error) == (name, args, None)


def test_unreadable_calls_become_errors():
    assert parse_sol_call("12*7", {}).error.startswith("cannot read the tool call")
    assert parse_json_call('{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}').arguments == \
        {"expression": "1"}
    assert parse_json_call("{oops").error.startswith("cannot read the tool call")


def test_sol_chat_json_cli(tiny_model, capsys, isolated_home):
    code = main(["chat", "--model", str(tiny_model), "--message", "hello", "--message", "again",
                 "--max-tokens", "3", "--seed", "0", "--json", "--system", "Be brief."])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for e in events:
        assert set(e) >= EVENT_KEYS.get(e["type"], {"type"}), e
    messages = [e for e in events if e["type"] == "message"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[-1]["completion_tokens"] <= 3
    (conv,) = Store().list_conversations()
    assert conv["system"] == "Be brief." and conv["messages"] == 4
    assert main(["chat", "--model", str(tiny_model), "--message", "x", "--max-tokens", "0"]) == 1


def test_an_answer_keeps_how_each_token_was_chosen(lm):
    from sol.core.chat.session import KEEP
    store = Store(":memory:")
    chat = ChatSession(lm, None, store=store)
    p = GenerationParams(max_tokens=12, sampling=SamplingParams(temperature=0.8, top_k=50, seed=5))
    events = list(chat.send("hello", p))
    answer = [e for e in events if e["type"] == "message" and e["role"] == "assistant"][-1]
    sampled = [e for e in events if e["type"] == "token" and not e["forced"]]
    trace = store.tokens(answer["id"])
    assert [t["id"] for t in trace] == [e["id"] for e in sampled] and len(trace) == answer["completion_tokens"]
    for t, e in zip(trace, sampled):
        x, full = t["explanation"], e["explanation"]
        assert x["draw"] == full["draw"] and x["index"] == full["index"] and len(t["top"]) <= KEEP
        assert x["ids"] == full["ids"][:len(x["ids"])] and len(x["ids"]) >= min(KEEP, len(full["ids"]))
        assert x["probs"] == pytest.approx(full["probs"][:len(x["ids"])], abs=1e-6)


def test_without_calls_is_the_answer_a_reader_sees():
    from sol.core.chat.markup import without_calls
    assert without_calls('Sure.<|tool_call|>calculator: 12*7<|tool_end|>') == "Sure."
    assert without_calls('a <tool_call>{"name": "f", "arguments": {}}</tool_call> b') == "a  b"
    assert without_calls("It is <|tool_call|>calcul") == "It is "          # unfinished: cut
    assert without_calls("It is <|to", streaming=True) == "It is "          # may become a call: held back
    assert without_calls("It is <|to") == "It is <|to"                      # finished: it never did
    assert without_calls("1 < 2", streaming=True) == "1 < 2"


def test_sol_chat_prints_the_answer_and_a_tool_line_not_the_markup(capsys):
    from sol.core.commands.chat import show

    def message():
        return {"type": "message", "role": "assistant", "prompt_tokens": 9, "completion_tokens": 4, "tokens_per_s": 1.0}
    events = [{"type": "token", "text": t} for t in ("Let me see.", " <|tool", "_call|>calculator: 12*7", "<|tool_end|>")]
    events += [message(), {"type": "tool_call", "name": "calculator", "arguments": {"expression": "12*7"}},
               {"type": "tool_result", "name": "calculator", "result": "84"},
               {"type": "token", "text": "<|tool_result|>84<|tool_end|>", "forced": True},
               {"type": "token", "text": "It is 84."}, message()]
    assert show(events, as_json=False)
    out, err = capsys.readouterr()
    assert out == "Let me see. \nIt is 84.\n"
    assert "[calculator -> 84]" in err
