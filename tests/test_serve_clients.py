"""`sol serve` driven by clients no one here wrote, pointed at it unchanged: LangChain's ChatOpenAI,
instructor, and lm-evaluation-harness's local-completions (offline, on a task YAML over a local JSONL,
against its own `hf` model on the same transformers folder)."""
from __future__ import annotations

import json

import openai
import pytest

from hf_models import make_hf_model
from serve_helpers import ServerProcess

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("clients")
    folder = home / "tinygpt2"
    make_hf_model("gpt2", folder)
    # lm-evaluation-harness's hf model wants an end-of-text token (it pads with it); so does Sol's server.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<unused0>", "pad_token": "<unused0>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    srv = ServerProcess(["--model", "starter", "--model", "words", "--model", str(folder)], home)
    srv.home, srv.folder = home, folder
    yield srv
    srv.stop()


def test_langchain_invoke_stream_and_bind_tools(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model="starter", base_url=server.url + "/v1", api_key="none", temperature=0, max_retries=0)
    answer = llm.invoke("what is 12 times 7?")
    assert "84" in answer.content and "<|" not in answer.content   # the server ran the starter's calculator
    assert "".join(chunk.content for chunk in llm.stream("what is 12 times 7?")) == answer.content
    # bind_tools: the client's tool, so the call comes back to it; it sends the result, the model answers.
    with_tools = llm.bind_tools([CALCULATOR])
    question = HumanMessage("what is 12 times 7?")
    call = with_tools.invoke([question])
    assert call.tool_calls[0]["name"] == "calculator" and call.tool_calls[0]["args"] == {"expression": "12*7"}
    streamed = None
    for chunk in with_tools.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls[0]["name"] == "calculator" and streamed.tool_calls[0]["args"] == {"expression": "12*7"}
    final = with_tools.invoke([question, call, ToolMessage("84", tool_call_id=call.tool_calls[0]["id"])])
    assert "84" in final.content and not final.tool_calls


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_gets_a_validated_object_from_the_words_model(server, mode):
    """A pydantic model without additionalProperties, bounded strings and integer; greedy, so the result
    is the same every run; max_tokens 4 x an example object's tokens, so whitespace or extra keys that
    never end would fail it."""
    import instructor
    from pydantic import BaseModel, Field

    from sol.core.formats.registry import resolve
    from sol.core.formats.tokenizer import Tokenizer

    class Character(BaseModel):
        name: str = Field(max_length=12)
        title: str = Field(max_length=12)
        age: int = Field(ge=1, le=99)

    example = Character(name="Hamlet", title="prince", age=30).model_dump_json()
    budget = 4 * len(Tokenizer.from_file(resolve("words") / "tokenizer.json").encode_ids(example,
                                                                                           add_special_tokens=False))
    client = instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0),
                                    mode=getattr(instructor.Mode, mode))
    obj, raw = client.chat.completions.create_with_completion(
        model="words", response_model=Character, max_retries=0, temperature=0, max_tokens=budget,
        messages=[{"role": "user", "content": "Who is Hamlet?"}])
    assert isinstance(obj, Character) and raw.usage.completion_tokens <= budget
    assert raw.choices[0].finish_reason == ("tool_calls" if mode == "TOOLS" else "stop")
    if mode == "TOOLS":
        assert [c.function.name for c in raw.choices[0].message.tool_calls] == ["Character"]


def test_lm_eval_local_completions_equals_its_hf_model(server, tmp_path, monkeypatch):
    """The same task through lm-evaluation-harness's `hf` model and through `sol serve`: the same
    log-likelihood for every choice (1e-3) and the same accuracy, at batch sizes 1 and 4."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    rows = [{"question": "The cat sat on the", "choices": [" mat", " moon", " dog"], "answer": 0},
            {"question": "One two three", "choices": [" four", " five"], "answer": 0},
            {"question": "Red green", "choices": [" blue", " cat", " seven"], "answer": 2},
            {"question": "To be or not to", "choices": [" be", " go"], "answer": 0},
            {"question": "Hello", "choices": [" world", " there", " you"], "answer": 1},
            {"question": "A rose by any other name would smell as", "choices": [" sweet", " sour"], "answer": 0}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sol_mc.yaml").write_text(
        "task: sol_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))

    def run(model, args, **kw):
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["sol_mc"], task_manager=tasks,
                                      log_samples=True, **kw)
        lls = [[r[0][0] for r in s["resps"]] for s in out["samples"]["sol_mc"]]
        return out["results"]["sol_mc"]["acc,none"], lls

    acc, want = run("hf", f"pretrained={server.folder},dtype=float32", batch_size=1, device="cpu")
    assert len(want) == len(rows) and sum(map(len, want)) == sum(len(r["choices"]) for r in rows)
    for batch in (1, 4):
        got_acc, got = run("local-completions",
                           f"model={server.folder.name},base_url={server.url}/v1/completions,"
                           f"tokenizer_backend=huggingface,tokenizer={server.folder},num_concurrent=1,"
                           f"max_retries=1,batch_size={batch}")
        assert got_acc == acc
        for w, g in zip(want, got):
            assert g == pytest.approx(w, abs=1e-3)
