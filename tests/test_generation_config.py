"""generation_config.json: its eos_token_id ends `sol generate` and the chat where transformers' generate
stops (Llama-3-Instruct's <|eot_id|>), and its sampling defaults are the chat's unless the user sets
their own. The reference is transformers 5 on a tiny random model written with save_pretrained."""
from __future__ import annotations

import json

import pytest
import torch
import transformers  # noqa: E402
from hf_models import make_hf_model

from sol.core.chat.session import ChatSession
from sol.core.cli import main
from sol.core.formats.checkpoint import load_model

PROMPT = "It is the east, and"


def run(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines() if line.strip()] if "--json" in args else out, err


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "llama"
    make_hf_model("llama-untied", folder)
    ids = load_model(folder).tokenizer.encode_ids(PROMPT)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        free = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    return folder, ids, free


def write_generation_config(folder, **fields):
    (folder / "generation_config.json").write_text(json.dumps(fields))


@pytest.mark.parametrize("as_list", [True, False])
def test_generate_stops_at_generation_configs_eos_like_transformers(hf_model, capsys, as_list):
    folder, ids, free = hf_model
    # a token the free run produces later, that did not come before: stopping there is visible
    k = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    stop = free[k]
    write_generation_config(folder, eos_token_id=[310, stop] if as_list else stop)
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert want[-1] == stop and len(want) == k + 1   # transformers stops there, the eos included
        rc, events, _ = run(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "16",
                             "--temperature", "0", "--json"], capsys)
        assert rc == 0
        done = events[-1]
        assert done["token_ids"] == want[:-1] and done["stop_reason"] == "eos"
        lm = load_model(folder)
        assert stop in ChatSession(lm).end_ids   # the chat ends its turns there too
    finally:
        (folder / "generation_config.json").unlink()


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_takes_the_models_sampling_defaults_unless_the_user_sets_them(hf_model, capsys):
    folder, _, _ = hf_model
    (folder / "chat_template.jinja").write_text(CHATML)
    write_generation_config(folder, do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05)
    try:
        base = ["chat", "--model", str(folder), "--message", "hello", "--max-tokens", "2", "--seed", "1"]
        rc, events, _ = run(base + ["--json"], capsys)
        assert rc == 0
        params = next(e for e in events if e["type"] == "token")["explanation"]["params"]
        assert (params["temperature"], params["top_p"], params["top_k"], params["repetition_penalty"],
                params["min_p"]) == (0.6, 0.9, 20, 1.05, 0.0)
        rc, events, _ = run(base + ["--json", "--temperature", "1.5", "--top-k", "0"], capsys)
        params = next(e for e in events if e["type"] == "token")["explanation"]["params"]
        assert (params["temperature"], params["top_p"], params["top_k"]) == (1.5, 0.9, 0)
        rc, _, err = run(base, capsys)   # said, not silent
        assert "generation_config.json" in err and "temperature 0.6" in err
        write_generation_config(folder, do_sample=False, temperature=0.6)   # transformers decodes greedily
        assert load_model(folder).sampling["temperature"] == 0.0
        write_generation_config(folder, eos_token_id="<|eot_id|>")
        rc, _, err = run(base, capsys)
        assert rc != 0 and "generation_config.json: eos_token_id must be a token id" in err
    finally:
        (folder / "chat_template.jinja").unlink()
        (folder / "generation_config.json").unlink()


def test_sol_models_without_generation_config_keep_the_chat_defaults(tiny_model, capsys):
    rc, events, _ = run(["chat", "--model", str(tiny_model), "--message", "hi", "--max-tokens", "1", "--json"],
                        capsys)
    params = next(e for e in events if e["type"] == "token")["explanation"]["params"]
    assert (params["temperature"], params["top_p"], params["top_k"]) == (0.7, 1.0, 0)


def test_serve_takes_the_models_sampling_defaults_for_fields_a_request_leaves_out(hf_model):
    """As `sol chat` and transformers: the API's defaults (OpenAI's temperature 1, ...) apply only where
    the model says nothing; a bad default is refused at start-up, naming the file."""
    from sol.core.errors import SolError
    from sol.core.serve.generate import request_params
    from sol.core.serve.served import Served
    folder, ids, _ = hf_model
    write_generation_config(folder, do_sample=True, temperature=0.6, top_p=0.9, top_k=20)
    try:
        served = Served("llama", load_model(folder), engine=None)

        def sampling(body):
            return request_params(body, served, ids, (), False, 0, (), None)[0].sampling
        got = sampling({})
        assert (got.temperature, got.top_p, got.top_k, got.min_p, got.repetition_penalty) == (0.6, 0.9, 20, 0.0, 1.0)
        got = sampling({"temperature": 0, "top_k": 0})
        assert (got.temperature, got.top_p, got.top_k) == (0.0, 0.9, 0)
        write_generation_config(folder, top_p=0.0)
        with pytest.raises(SolError, match=r"generation_config\.json: .*top-p 0.0"):
            Served("llama", load_model(folder), engine=None)
    finally:
        (folder / "generation_config.json").unlink()
    got = request_params({}, Served("llama", load_model(folder), engine=None), ids, (), False, 0, (), None)[0].sampling
    assert (got.temperature, got.top_p, got.top_k) == (1.0, 1.0, 0)   # no file: OpenAI's defaults
