"""Chat templates against transformers 5: where they are read from, the Jinja environment, and a full
tool round trip through real templates (tests/templates/README.md names where each came from).

transformers is the reference only; the tokenizers are tiny ones written with save_pretrained."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers  # noqa: E402

from sol.core.chat.session import ChatSession, tool_call_id
from sol.core.errors import SolError
from sol.core.formats.tokenizer import SOL_CHAT_TEMPLATE, Tokenizer

TEMPLATES = Path(__file__).parent / "templates"
FAMILY_TOKENS = {
    "qwen2.5-instruct": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "mistral-nemo-instruct-2407": ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                   "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
    "deepseek-r1-distill-qwen-32b": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
    "llama-3.2-instruct": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "phi-3.5-mini-instruct": ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    "smollm3-3b": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "qwen3-0.6b": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "gemma-3-1b-it": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
}
FAMILY_TOKENS["mistral-7b-instruct-v0.3"] = FAMILY_TOKENS["mistral-nemo-instruct-2407"]
FAMILY_TOKENS["phi-3-mini-4k-instruct"] = FAMILY_TOKENS["phi-3.5-mini-instruct"]
BOS_EOS = {"mistral": ("<s>", "</s>"), "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
           "llama": ("<|begin_of_text|>", "<|eot_id|>"), "phi": ("<s>", "<|endoftext|>"),
           "gemma": ("<bos>", "<eos>")}
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def save_tokenizer(folder: Path, special: list[str], chat_template=None, bos=None, eos=None, **config):
    """A tiny word-level tokenizer with `special` tokens, written with transformers' save_pretrained."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(special)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                               **config)
    if chat_template is not None:
        tok.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return folder


def real_template(folder: Path, name: str):
    """A tokenizer folder holding the real template `name` (as transformers 5 saves it: chat_template.jinja)."""
    bos, eos = next((v for k, v in BOS_EOS.items() if name.startswith(k)), (None, "<|im_end|>"))
    return save_tokenizer(folder, FAMILY_TOKENS[name], (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"),
                          bos=bos, eos=eos)


def hf_render(folder: Path, messages, **kw) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def sol_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(folder / "tokenizer.json")


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! Olá, 世界."}, {"role": "user", "content": "and now?"}]


# ---- item 3: where templates are read from ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FAMILY_TOKENS))
def test_each_real_template_renders_exactly_like_transformers(tmp_path, name):
    folder = real_template(tmp_path / name, name)
    assert (folder / "chat_template.jinja").is_file()   # where transformers 5 writes it
    tok = sol_tokenizer(folder)
    for gen in (True, False):
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == \
            hf_render(folder, CHAT, add_generation_prompt=gen)


def test_named_templates_pick_tool_use_with_tools_as_transformers_does(tmp_path):
    default = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    tool_use = "TOOLS {{ tools | tojson }}" + default
    # transformers 5 saves a dict as chat_template.jinja + additional_chat_templates/tool_use.jinja
    folder = save_tokenizer(tmp_path / "new", ["<|im_start|>"], {"default": default, "tool_use": tool_use})
    assert (folder / "additional_chat_templates" / "tool_use.jinja").is_file()
    # the legacy form: a list of named templates in tokenizer_config.json
    legacy = save_tokenizer(tmp_path / "legacy", ["<|im_start|>"])
    cfg = json.loads((legacy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]
    (legacy / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = CHAT[1:3]
    for d in (folder, legacy):
        tok = sol_tokenizer(d)
        for tools in (None, [CALCULATOR]):
            assert tok.apply_chat_template(msgs, tools=tools) == hf_render(d, msgs, tools=tools, add_generation_prompt=True)
        assert tok.apply_chat_template(msgs, tools=[CALCULATOR]).startswith("TOOLS ")
        assert tok.apply_chat_template(msgs).startswith("<user>")


def test_chat_template_json_is_read(tmp_path):
    folder = save_tokenizer(tmp_path / "m", ["<|im_start|>", "<|im_end|>"])
    template = (TEMPLATES / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert sol_tokenizer(folder).apply_chat_template(CHAT) == \
        Tokenizer.from_file(real_template(tmp_path / "q", "qwen2.5-instruct") / "tokenizer.json").apply_chat_template(CHAT)
    (folder / "chat_template.json").write_text("{oops")
    with pytest.raises(SolError, match="chat_template.json: invalid JSON at line 1"):
        sol_tokenizer(folder)


@pytest.mark.parametrize("tokens, family", [
    (["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "Phi-3"),
    (["<|im_start|>", "<|im_end|>"], "ChatML"),
    (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "Llama 3"),
    (["<s>", "</s>", "[INST]", "[/INST]"], "Mistral")])
def test_a_known_family_without_a_template_is_an_error_not_sols_template(tmp_path, tokens, family):
    tok = sol_tokenizer(save_tokenizer(tmp_path / "m", tokens))
    assert tok.chat_template is None
    with pytest.raises(SolError, match=f"has {family} chat tokens .* but the model has no chat template"):
        tok.apply_chat_template(CHAT)


def test_sol_vocabularies_still_get_sols_template(tiny_model):
    tok = Tokenizer.from_file(tiny_model / "tokenizer.json")
    assert tok.is_sol and tok.template_family is None and tok.chat_template == SOL_CHAT_TEMPLATE


# ---- item 5: the Jinja environment ----------------------------------------------------------------------
FEATURES = (
    "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}"
    "{%- if m.role == 'assistant' -%}{% generation %}[A:{{ m.content }}]{% endgeneration %}"
    "{%- else -%}[{{ m.role }}:{{ m.content }}]{%- endif -%}{%- endfor -%}"
    "{{ tools | tojson(indent=2, sort_keys=true) }}|{{ {'é': [1, 2], 'a': None} | tojson(separators=(',', ':')) }}"
    "|{{ {'é': 1} | tojson(ensure_ascii=true) }}|{{ dict(b=1, **{'c': 2}) | tojson }}|{{ ns.n }}"
    "|{{ strftime_now('%Y') }}{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}")


def test_jinja_extras_render_as_in_transformers(tmp_path):
    folder = save_tokenizer(tmp_path / "m", ["<|im_start|>"], FEATURES)
    msgs = CHAT[1:3]
    got = sol_tokenizer(folder).apply_chat_template(msgs, tools=[CALCULATOR])
    assert got == hf_render(folder, msgs, tools=[CALCULATOR], add_generation_prompt=True)
    assert "[A:Hello! Olá, 世界.]" in got and '{"é":[1,2],"a":null}' in got and '{"\\u00e9": 1}' in got
    with pytest.raises(SolError, match="chat template: too long"):
        sol_tokenizer(folder).apply_chat_template(CHAT * 3)


def test_smollm3_generation_blocks_render_like_transformers(tmp_path):
    folder = real_template(tmp_path / "s", "smollm3-3b")
    tok = sol_tokenizer(folder)
    for kw in ({}, {"enable_thinking": False}):
        assert tok.apply_chat_template(CHAT, **kw) == hf_render(folder, CHAT, add_generation_prompt=True, **kw)


THINKING = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "<think>\nThe user greets.\n</think>\n\nHello!"},
            {"role": "user", "content": "and now?"},
            {"role": "assistant", "content": "Now.", "reasoning_content": "A second thought."},
            {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}]


@pytest.mark.parametrize("messages", [CHAT, THINKING, THINKING[:-1], THINKING[:3]])
def test_qwen3_thinking_renders_like_transformers(tmp_path, messages):
    """Qwen3's switch (enable_thinking, read when the template is rendered) and its reasoning in the history
    (<think> in the content, or reasoning_content), with and without a generation prompt."""
    folder = real_template(tmp_path / "q", "qwen3-0.6b")
    tok = sol_tokenizer(folder)
    for kw in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        for gen in (True, False):
            got = tok.apply_chat_template(messages, add_generation_prompt=gen, **kw)
            assert got == hf_render(folder, messages, add_generation_prompt=gen, **kw)
    assert tok.apply_chat_template(messages, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(messages).endswith("<|im_start|>assistant\n")


def test_gemma3_folds_the_system_prompt_and_refuses_what_transformers_refuses(tmp_path):
    folder = real_template(tmp_path / "g", "gemma-3-1b-it")
    tok = sol_tokenizer(folder)
    got = tok.apply_chat_template(CHAT)
    assert got.startswith("<bos><start_of_turn>user\nYou are terse.\n\nhello<end_of_turn>\n")
    assert got.endswith("<start_of_turn>model\n")
    for bad in (CHAT[1:2] * 2, [CHAT[2]]):   # two user turns in a row; the model first
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            hf_render(folder, bad, add_generation_prompt=True)
        with pytest.raises(SolError, match="chat template: Conversation roles must alternate user/assistant"):
            tok.apply_chat_template(bad)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}", "{{ messages.__class__.__base__ }}", "{% set ns = namespace(_x=1) %}",
    "{% set ns = namespace() %}{% set ns._y = 1 %}", "{{ dict.__call__.__globals__ }}"])
def test_the_sandbox_still_holds(tmp_path, template):
    tok = Tokenizer(sol_tokenizer(save_tokenizer(tmp_path / "m", [])).hf, templates={"default": template})
    with pytest.raises(SolError, match="chat template"):
        tok.apply_chat_template(CHAT)


def test_a_template_type_error_is_a_sol_error(tmp_path):
    tok = Tokenizer(sol_tokenizer(save_tokenizer(tmp_path / "m", [])).hf,
                    templates={"default": "{{ 'x' + messages[0].content }}"})
    with pytest.raises(SolError, match="TypeError"):
        tok.apply_chat_template([{"role": "user", "content": None}])


# ---- item 6: a tool round trip through real templates ------------------------------------------------------
class Tools:
    def tool_schemas(self):
        return [CALCULATOR]

    def tools(self):
        return {}


def stored_round_trip():
    """A conversation as the chat stores it: a question, a JSON tool call, its result, the answer, a new
    question."""
    call = {"name": "calculator", "arguments": {"expression": "6*7"}, "style": "json"}
    return [
        {"id": 11, "parent_id": None, "role": "user", "content": "six times seven?", "meta": {}},
        {"id": 12, "parent_id": 11, "role": "assistant", "meta": {"tool_call": call},
         "content": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'},
        {"id": 13, "parent_id": 12, "role": "tool", "content": "42", "meta": {"name": "calculator", "ok": True}},
        {"id": 14, "parent_id": 13, "role": "assistant", "content": "It is 42.", "meta": {}},
        {"id": 15, "parent_id": 14, "role": "user", "content": "and 6*8?", "meta": {}},
    ]


@pytest.mark.parametrize("name", ["deepseek-r1-distill-qwen-32b", "mistral-nemo-instruct-2407",
                                  "mistral-7b-instruct-v0.3", "qwen2.5-instruct", "llama-3.2-instruct",
                                  "qwen3-0.6b"])
def test_tool_round_trip_through_real_templates_matches_transformers(tmp_path, name):
    from transformers.utils.chat_template_utils import render_jinja_template
    folder = real_template(tmp_path / name, name)
    tok = sol_tokenizer(folder)
    seen = []
    original = tok.apply_chat_template

    def spy(messages, **kw):
        seen.append((messages, kw))
        return original(messages, **kw)
    tok.apply_chat_template = spy
    lm = SimpleNamespace(tokenizer=tok, model=None, config=SimpleNamespace(context=4096, extra={}))
    chat = ChatSession(lm, Tools())
    got = chat._render(stored_round_trip())
    # the messages are built as transformers' docs describe
    call_msg, tool_msg = seen[0][0][1], seen[0][0][2]
    (call,) = call_msg["tool_calls"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"]) and call["id"] == tool_call_id(12)
    assert call["type"] == "function" and call["function"]["name"] == "calculator"
    assert call_msg.get("content", None) is None
    assert tool_msg == {"role": "tool", "content": "42", "tool_call_id": call["id"], "name": "calculator"}
    messages, kw = seen[-1]   # what rendered: those, or the form a template was written for
    if name.startswith("qwen3"):
        # Qwen3's template adds the call's content to strings: transformers fails without it, as Sol's first
        # try does; content "" (Qwen-Agent's form) renders the call as the model was trained.
        with pytest.raises(Exception, match="has no attribute 'content'"):
            hf_render(folder, seen[0][0], tools=kw["tools"], add_generation_prompt=True)
        assert messages[1]["content"] == "" and messages[1]["tool_calls"] == [call]
        assert "<|im_start|>assistant\n<tool_call>\n{\"name\": \"calculator\"" in got
    if name.startswith("deepseek"):
        # transformers 5's apply_chat_template drops None-valued keys, which this template (written for None)
        # cannot render; its own renderer, given the same messages, is the reference.
        special = transformers.AutoTokenizer.from_pretrained(folder).special_tokens_map
        want = render_jinja_template([messages], tools=kw["tools"], chat_template=tok.chat_template,
                                     add_generation_prompt=True, **special)[0][0]
        assert "<｜tool▁sep｜>calculator\n```json\n{\"expression\": \"6*7\"}\n```" in got   # the call is there
    else:
        want = hf_render(folder, messages, tools=kw["tools"], add_generation_prompt=True)
    assert got == want
    assert "42" in got and "It is 42." in got and "and 6*8?" in got
    assert "calculator" in got.split("six times seven?")[-1]   # the call is rendered, not dropped


@pytest.mark.parametrize("name", ["mistral-7b-instruct-v0.3", "mistral-nemo-instruct-2407",
                                  "deepseek-r1-distill-qwen-32b", "qwen2.5-instruct", "qwen3-0.6b"])
def test_a_chat_with_a_tool_call_through_a_real_template_then_a_next_turn(tmp_path, monkeypatch, name):
    """The live loop: the model calls the calculator, the result goes back, it answers, and the next turn
    renders the whole history (the call with its id, the result with its tool_call_id) without an error."""
    from conftest import make_tiny_model
    from test_chat import CountingPlugins, params, script

    from sol.core.formats.checkpoint import load_model
    model = make_tiny_model(tmp_path / "m", context=2048)
    (model / "chat_template.jinja").write_text((TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"),
                                               encoding="utf-8")
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    lm = load_model(model)
    pm = CountingPlugins()
    chat = ChatSession(lm, pm)
    script(monkeypatch, lm.tokenizer, '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}'
                                      '\n</tool_call>', "It is 42.")
    first = list(chat.send("six times seven?", params(200)))
    script(monkeypatch, lm.tokenizer, "It is 48.")
    second = list(chat.send("and 6*8?", params(200)))
    errors = [e for e in first + second if e["type"] == "error"]
    assert not errors, errors
    assert pm.calls == [("calculator", {"expression": "6*7"})]
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    prompt = chat._render(chat.messages[:5])
    call_id = tool_call_id(chat.messages[1]["id"])
    if name.startswith("mistral"):
        assert f'"name": "calculator", "arguments": {{"expression": "6*7"}}, "id": "{call_id}"}}]' in prompt
        assert f'"content": 42, "call_id": "{call_id}"}}[/TOOL_RESULTS]' in prompt
    elif name.startswith("deepseek"):
        assert '<｜tool▁sep｜>calculator\n```json\n{"expression": "6*7"}\n```' in prompt
    else:
        assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>' in prompt
    assert "It is 42." in prompt and "and 6*8?" in prompt


# ---- end to end: `sol chat` on the tiny Qwen3, Gemma 3 and Phi-3 models with their real templates ------------
CHAT_MODELS = {"qwen3": "qwen3-0.6b", "gemma3": "gemma-3-1b-it", "phi3": "phi-3-mini-4k-instruct"}


def chat_model(folder: Path, family: str, monkeypatch):
    """A tiny random model of `family` whose tokenizer has the family's special tokens and its real template,
    written with save_pretrained as the Hub's files are. Room for Qwen3's tool prompt: 1024 positions."""
    from hf_models import CORPUS, FAMILIES, VOCAB, fill_vocab, make_hf_model

    from sol.core.formats.tokenizer import train_bpe
    base = FAMILIES[family]

    def longer(t):
        cfg = base(t)
        cfg.max_position_embeddings = 1024
        return cfg
    monkeypatch.setitem(FAMILIES, family, longer)
    ref = make_hf_model(family, folder)
    name = CHAT_MODELS[family]
    corpus = folder.parent / "chat-corpus.txt"
    corpus.write_text(CORPUS + "You are terse. hello world, and now? <think> </think> calculator", encoding="utf-8")
    special = FAMILY_TOKENS[name]
    bos, eos = next((v for k, v in BOS_EOS.items() if name.startswith(k)), (None, "<|im_end|>"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=fill_vocab(train_bpe([corpus], VOCAB - 20, special)).hf,
                                              bos_token=bos, eos_token=eos)
    hf.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    hf.save_pretrained(folder)
    return ref, hf


@pytest.mark.parametrize("family", sorted(CHAT_MODELS))
def test_sol_chat_on_tiny_models_renders_and_answers_like_transformers(tmp_path, monkeypatch, capsys, family):
    """Two turns of `sol chat --system ... --message ... --message ...` (tools on): every prompt Sol renders is
    transformers' apply_chat_template of the same messages, token for token, and the greedy answer is
    transformers' generate from those ids up to the end of the turn."""
    import torch

    from sol.core.cli import main
    from sol.core.formats.checkpoint import load_model
    folder = tmp_path / family
    ref, hf = chat_model(folder, family, monkeypatch)
    renders = []
    original = Tokenizer.apply_chat_template

    def spy(self, messages, **kw):
        out = original(self, messages, **kw)
        renders.append((json.loads(json.dumps(messages)), kw, out))
        return out
    monkeypatch.setattr(Tokenizer, "apply_chat_template", spy)
    rc = main(["chat", "--model", str(folder), "--system", "You are terse.", "--message", "hello world",
               "--message", "and now?", "--max-tokens", "12", "--temperature", "0", "--json"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rc == 0, [e for e in events if e["type"] == "error"]
    end_ids = ChatSession(load_model(folder)).end_ids
    # where the template ends a turn, with no generation_config.json to say so (Gemma's eos is <eos>)
    turn_end = {"qwen3": "<|im_end|>", "gemma3": "<end_of_turn>", "phi3": "<|end|>"}[family]
    assert hf.eos_token_id in end_ids and hf.convert_tokens_to_ids(turn_end) in end_ids
    turns = [[]]
    for e in events:
        if e["type"] == "token":
            turns[-1].append(e["id"])
        elif e["type"] == "message" and e["role"] == "assistant":
            turns.append([])
    prompts = [r for r in renders if r[1].get("add_generation_prompt", True)]
    assert len(prompts) >= 2
    for messages, kw, text in renders:
        assert messages[0] == {"role": "system", "content": "You are terse."}
        assert kw.get("tools") and kw["tools"][0]["function"]["name"] == "calculator"   # the built-in tool
        assert text == hf.apply_chat_template(messages, tokenize=False, **kw)
    for (messages, kw, text), answer in zip(prompts[-2:], turns[:2]):
        ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
        assert load_model(folder).tokenizer.encode_ids(text, add_special_tokens=False) == list(ids)
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(want) if t in end_ids), len(want))
        assert answer == want[:stop] and answer
    assert prompts[-1][0][-1] == {"role": "user", "content": "and now?"}
    assert prompts[-1][0][-2]["role"] == "assistant"   # the first answer is in the second prompt


def test_serve_passes_chat_template_kwargs_to_the_template(tmp_path):
    """`chat_template_kwargs` in a chat request (vLLM's and llama.cpp's name) reaches the template:
    Qwen3's enable_thinking switches its thinking off; the server's own variables cannot be replaced."""
    from conftest import make_tiny_model

    from sol.core.formats.checkpoint import load_model
    from sol.core.serve.chat_prompt import render_chat, template_kwargs
    from sol.core.serve.protocol import ApiError
    from sol.core.serve.served import Served
    folder = make_tiny_model(tmp_path / "q3")
    (folder / "chat_template.jinja").write_text((TEMPLATES / "qwen3-0.6b.jinja").read_text(encoding="utf-8"))
    served = Served("q3", load_model(folder), engine=None)
    plain = render_chat(served, CHAT, None, template_kwargs({}))
    off = render_chat(served, CHAT, None, template_kwargs({"chat_template_kwargs": {"enable_thinking": False}}))
    assert plain.endswith("<|im_start|>assistant\n")
    assert off == plain + "<think>\n\n</think>\n\n"
    for bad in ({"add_generation_prompt": False}, ["enable_thinking"], {"not a name": 1}):
        with pytest.raises(ApiError, match="chat_template_kwargs"):
            template_kwargs({"chat_template_kwargs": bad})


def test_sol_chat_template_var_reaches_the_template(tmp_path, capsys):
    """`sol chat --template-var enable_thinking=false` (read as JSON: false) turns Qwen3's thinking off."""
    from conftest import make_tiny_model

    from sol.core.cli import main
    from sol.core.commands.chat import template_vars
    from sol.core.formats.checkpoint import load_model
    folder = make_tiny_model(tmp_path / "q3", context=2048)   # the template lists the calculator tool
    (folder / "chat_template.jinja").write_text((TEMPLATES / "qwen3-0.6b.jinja").read_text(encoding="utf-8"))
    assert template_vars(["enable_thinking=false", "name=Sol", "n=3"]) == {"enable_thinking": False, "name": "Sol",
                                                                           "n": 3}
    lm = load_model(folder)
    msgs = [{"role": "user", "content": "hello"}]
    assert ChatSession(lm)._render(msgs).endswith("<|im_start|>assistant\n")
    assert ChatSession(lm, template_vars={"enable_thinking": False})._render(msgs).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    base = ["chat", "--model", str(folder), "--message", "hello", "--max-tokens", "2", "--json"]
    assert main(base + ["--template-var", "enable_thinking=false"]) == 0
    assert main(base + ["--template-var", "tools=[]"]) != 0
    assert "--template-var tools=[]: write NAME=VALUE" in capsys.readouterr().err
