"""The pieces of `sol serve`'s tools and schemas, without a server: which tools a model was trained
to call, strict schemas, and the grammar that forces a call."""
from __future__ import annotations

import json

import pytest

from sol.core.errors import SolError
from sol.core.serve.schema import check_openai_strict, strict_schema
from sol.core.train.chat_format import called_in, tools_field


def test_the_tools_a_chat_file_calls_are_named_in_every_markup(tmp_path):
    f = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "12*7?"},
                          {"role": "assistant", "content": "<|tool_call|>calculator: 12*7<|tool_end|>"}]},
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]}]},
            {"messages": [{"role": "assistant", "content": '<tool_call>{"name": "search", "arguments": {}}</tool_call>'},
                          {"role": "user", "content": "<|tool_call|>not_assistant: x<|tool_end|>"}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert called_in(f) == ["calculator", "search", "weather"]
    assert tools_field(["b", "a", "b"]) == {"tools": ["a", "b"]} and tools_field([]) == {}
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\nnot json\n')
    with pytest.raises(SolError, match="bad.jsonl, line 2"):
        called_in(tmp_path / "bad.jsonl")


def test_objects_allow_only_their_properties_unless_they_say_so():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
        "c": {"type": "object", "additionalProperties": True}},
        "$defs": {"Item": {"properties": {"y": {"type": "string"}}}}, "x-guidance": {"whitespace_flexible": True}}
    out = strict_schema(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["$defs"]["Item"]["additionalProperties"] is False and out["properties"]["c"]["additionalProperties"]
    assert "x-guidance" not in out and "additionalProperties" not in schema   # a copy


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array"}, "root"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a"]}, "additionalProperties"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": False}, "required"),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {}, "additionalProperties": False,
                                             "patternProperties": {}}},
      "required": ["a"], "additionalProperties": False}, "patternProperties"),
])
def test_strict_refuses_what_openai_refuses_naming_the_keyword(schema, keyword):
    with pytest.raises(SolError, match=keyword):
        check_openai_strict(schema, "schema")


def test_strict_accepts_what_openai_accepts():
    check_openai_strict({"type": "object", "properties": {"a": {"type": ["string", "null"], "maxLength": 3},
                                                          "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
                         "required": ["a", "b"], "additionalProperties": False}, "schema")


def test_a_forced_call_is_the_models_own_markup_with_the_tools_schema():
    import llguidance

    from sol.core.formats.checkpoint import load_model
    from sol.core.formats.registry import resolve
    from sol.core.serve.constrain import lark_grammar, ll_tokenizer
    from sol.core.serve.tools import call_grammar
    lm = load_model(resolve("starter"))
    tok = lm.tokenizer
    ll = ll_tokenizer(tok, lm.config.vocab_size)
    tools = {"weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}},
                         "required": ["city"]},
             "pick": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3},
                                                       "m": {"type": "integer"}}, "required": ["n", "m"]}}

    def accepts(text, names, parallel=False):
        m = llguidance.LLMatcher(ll, lark_grammar(call_grammar(tok, tools, names, parallel), "t"), log_level=0)
        ok = all(m.consume_token(t) for t in tok.encode_ids(text, add_special_tokens=False))
        return ok and not m.is_error() and m.is_accepting()
    assert accepts("<|tool_call|>weather: paris<|tool_end|>", ["weather"])
    assert not accepts("<|tool_call|>weather: berlin<|tool_end|>", ["weather"])        # maxLength 5
    assert not accepts("<|tool_call|>weather: paris<|tool_end|>", ["pick"])           # not the named one
    assert not accepts("<|tool_call|>weather: paris<|tool_end|>" * 2, ["weather"])    # parallel_tool_calls false
    assert accepts("<|tool_call|>weather: paris<|tool_end|>" * 2, ["weather"], parallel=True)
    assert "%json" in call_grammar(tok, tools, ["pick"], False)   # no lone string: arguments as JSON, strict
    assert '"additionalProperties": false' in call_grammar(tok, tools, ["pick"], False)


def test_plugin_tools_modes_and_their_flags():
    import argparse

    from sol.core.commands import serve
    from sol.core.plugins.manager import PluginManager
    from sol.core.serve.tools import ServerTools
    p = argparse.ArgumentParser()
    serve.register(p.add_subparsers())
    mode = {tuple(a): p.parse_args(["serve", "--model", "m", *a]).plugin_tools
            for a in ([], ["--plugin-tools"], ["--plugin-tools", "trained"], ["--plugin-tools", "none"],
                      ["--no-plugin-tools"])}
    assert mode == {(): "trained", ("--plugin-tools",): "all", ("--plugin-tools", "trained"): "trained",
                    ("--plugin-tools", "none"): "none", ("--no-plugin-tools",): "none"}
    plugins = PluginManager(safe_mode=True)
    plugins.load()
    assert "calculator" in plugins.tools()
    assert set(ServerTools(plugins, "all").runs([])) == set(plugins.tools())
    assert list(ServerTools(plugins, "trained").runs(["calculator", "not_a_plugin"])) == ["calculator"]
    assert ServerTools(plugins, "trained").runs([]) == {} and ServerTools(plugins, "none").runs(["calculator"]) == {}
    assert "calculator" in ServerTools(plugins, "none").known()   # its schema still reads the model's calls
    with pytest.raises(SolError, match="--plugin-tools some"):
        ServerTools(plugins, "some")
    from sol.core.serve.tools import trained_tools
    assert trained_tools({"tools": ["calculator"]}, "m/sol.json") == ["calculator"] and trained_tools({}, "x") == []
    with pytest.raises(SolError, match=r"m/sol.json: \"tools\" must be a list"):
        trained_tools({"tools": "calculator"}, "m/sol.json")
    with pytest.raises(SolError, match="--prefix-cache-mb -1: must be 0"):
        serve.load_all(p.parse_args(["serve", "--model", "starter", "--prefix-cache-mb", "-1"]))
