"""Training in a model's own chat format (issue 27, "Template"): the ids Sol trains on equal transformers'
apply_chat_template(tokenize=True), and the loss mask covers exactly the assistant turns, named here token
by token. transformers is the reference only; the tokenizers are tiny byte-level BPEs with each family's
special tokens, written with save_pretrained, and the templates are the real ones in tests/templates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from sol.core.errors import SolError
from sol.core.formats.tokenizer import Tokenizer
from sol.core.train.chat_format import encode

TEMPLATES = Path(__file__).parent / "templates"
TEXT = ["You are terse. hello Hello! Olá, 世界. and now? What is 12 times 7? It is 84. calculator expression "
        "name arguments Evaluate an arithmetic"] * 4
# template, special tokens, bos (added by the tokenizer's post-processor, as Llama 3's and Gemma's do), eos, turn end
FAMILIES = {
    "chatml": ("qwen2.5-instruct", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "<|im_end|>"),
    "llama3": ("llama-3.2-instruct", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": ("gemma-3-1b-it", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              "<end_of_turn>"),
}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! Olá, 世界."}, {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "It is 84."}]
KW = {"date_string": "26 Jul 2024"}   # Llama 3's template writes today's date unless given one
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def make_tokenizer(folder: Path, template: str, special: list[str], bos: str | None, eos: str) -> Path:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:   # encode() adds BOS: a template that writes bos_token itself must not get a second one
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, hf.token_to_id(bos))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token=eos)
    tok.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return folder


def family_folder(tmp_path: Path, family: str) -> Path:
    name, special, bos, eos, _ = FAMILIES[family]
    return make_tokenizer(tmp_path / family, (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"),
                          special, bos, eos)


def hf_ids(folder: Path, messages, **kw) -> list[int]:
    out = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def target_runs(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The masked tokens, decoded run by run."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ids_are_transformers_and_the_mask_is_the_assistant_turns(tmp_path, family):
    folder = family_folder(tmp_path, family)
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    vocab = tok.vocab_size
    ids, mask = encode(tok, CHAT, template_vars=KW)
    assert ids == hf_ids(folder, CHAT, **KW)
    end = FAMILIES[family][4]
    # The end-of-turn token is a target (the model learns to stop); the "\n" ChatML and Gemma write after it is not.
    assert target_runs(tok, ids, mask) == [f"Hello! Olá, 世界.{end}", f"It is 84.{end}"]
    bos = FAMILIES[family][2]
    if bos:
        assert ids.count(tok.token_to_id(bos)) == 1 and ids[0] == tok.token_to_id(bos)
    assert tok.vocab_size == vocab and not tok.is_sol


def test_a_prompt_ends_with_the_generation_prompt(tmp_path):
    folder = family_folder(tmp_path, "chatml")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    ids, mask = encode(tok, CHAT[:2], add_generation_prompt=True)
    assert ids == hf_ids(folder, CHAT[:2], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and not any(mask)


def test_generation_marks_give_transformers_assistant_mask(tmp_path):
    """SmolLM3 marks the assistant's text with {% generation %}: the mask is transformers' own
    return_assistant_tokens_mask, header and all, as that template says."""
    folder = make_tokenizer(tmp_path / "smol", (TEMPLATES / "smollm3-3b.jinja").read_text(encoding="utf-8"),
                            ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    ids, mask = encode(tok, CHAT)
    hf = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(hf["input_ids"])
    assert mask == [bool(m) for m in hf["assistant_masks"]]
    assert target_runs(tok, ids, mask) == ["<|im_start|>assistant\nHello! Olá, 世界.<|im_end|>\n",
                                           "<|im_start|>assistant\nIt is 84.<|im_end|>\n"]


def test_tool_calls_train_in_the_templates_own_form(tmp_path):
    """A call written as the chat stores it (<tool_call>{json}</tool_call>, or Sol's markup) goes to Qwen2.5's
    template structured, as the chat sends it; the call and the answer are targets, the tool result is not."""
    folder = family_folder(tmp_path, "chatml")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'
    data = [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": call},
            {"role": "tool", "content": "84"}, {"role": "assistant", "content": "It is 84."}]
    structured = [data[0], {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": {"expression": "12*7"}}}]}, {"role": "tool", "content": "84"}, data[3]]
    ids, mask = encode(tok, data, tools=[CALCULATOR])
    assert ids == hf_ids(folder, structured, tools=[CALCULATOR])
    assert target_runs(tok, ids, mask) == [
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call><|im_end|>',
        "It is 84.<|im_end|>"]
    sol_markup = [data[0], {"role": "assistant", "content": "<|tool_call|>calculator: 12*7<|tool_end|>"}, *data[2:]]
    assert encode(tok, sol_markup, tools=[CALCULATOR]) == (ids, mask)


def test_a_conversation_the_template_refuses_names_the_line_and_the_template_line(tmp_path):
    folder = family_folder(tmp_path, "gemma")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    bad = [{"role": "user", "content": "hello"}, {"role": "user", "content": "again"},
           {"role": "assistant", "content": "Hello!"}]
    with pytest.raises(SolError) as e:
        encode(tok, bad, where="chats.jsonl:7")
    msg = str(e.value)
    template = (folder / "chat_template.jinja").read_text(encoding="utf-8").splitlines()
    line = next(n for n, text in enumerate(template, 1) if "raise_exception" in text)
    assert msg.startswith(f"chats.jsonl:7: the chat template ({folder / 'chat_template.jinja'}:{line}) cannot "
                          "render this conversation: Conversation roles must alternate")
    assert "\n" not in msg


def test_a_template_that_rewrites_earlier_turns_is_named(tmp_path):
    """Qwen3 keeps the thinking only after the last question, so an earlier turn renders differently once
    later turns follow: no rendering tells that turn's tokens, and the line is named."""
    folder = make_tokenizer(tmp_path / "q3", (TEMPLATES / "qwen3-0.6b.jinja").read_text(encoding="utf-8"),
                            ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    ids, mask = encode(tok, CHAT[:3])   # one turn: fine, the empty thinking block is part of the answer
    assert ids == hf_ids(folder, CHAT[:3])
    assert target_runs(tok, ids, mask) == ["<think>\n\n</think>\n\nHello! Olá, 世界.<|im_end|>"]
    with pytest.raises(SolError, match=r"^chats.jsonl:2: the chat template .* writes messages\[2\]"):
        encode(tok, CHAT, where="chats.jsonl:2")


def test_sols_own_models_keep_sols_format(tiny_model):
    from sol.core.data import conversations
    from sol.core.formats.checkpoint import load_model
    tok = load_model(tiny_model).tokenizer
    assert encode(tok, CHAT) == conversations.encode(tok, CHAT)


def test_sft_trains_a_qwen2_folder_in_chatml_and_keeps_its_template(tmp_path):
    """`sol train sft --model <Qwen2 folder with ChatML>`: the vocabulary stays, the run trains, and the
    result still has its chat template and tokenizer_config.json."""
    import argparse

    from hf_models import make_hf_model
    from sol.core.formats.checkpoint import load_model
    from sol.core.train.stages import builtin_stages
    folder = tmp_path / "qwen"
    make_hf_model("qwen2", folder)
    family_folder(tmp_path, "chatml")
    for f in (tmp_path / "chatml").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(4)), encoding="utf-8")
    spec = next(s for s in builtin_stages() if s.name == "sft")
    p = argparse.ArgumentParser()
    spec.add_arguments(p)
    args = p.parse_args(["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "out"),
                         "--max-steps", "2", "--batch-size", "2", "--threads", "1", "--val-fraction", "0"])
    events = []
    spec.run(args, events.append)
    assert any(e["type"] == "step" for e in events) and events[-1]["type"] == "done"
    parent, child = load_model(folder), load_model(tmp_path / "out")
    assert child.tokenizer.vocab_size == parent.tokenizer.vocab_size
    assert child.model.cfg.vocab_size == parent.model.cfg.vocab_size
    assert child.tokenizer.chat_template == parent.tokenizer.chat_template
    assert encode(child.tokenizer, CHAT) == encode(parent.tokenizer, CHAT)


def test_a_model_without_a_chat_template_is_refused_by_the_chat_stages(tmp_path):
    from hf_models import make_hf_model
    from sol.core.train.common import load_parent
    make_hf_model("qwen2", tmp_path / "base")
    with pytest.raises(SolError, match=r"--model .*base: has no chat template"):
        load_parent(str(tmp_path / "base"), "cpu")
