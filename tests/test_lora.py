"""LoRA adapters: Sol's training against transformers + peft step by step, PEFT's file format both ways,
merging, and the errors for adapters that do not fit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_models import make_hf_model  # noqa: E402
from test_train import stage_args  # noqa: E402

from sol.core.errors import SolError  # noqa: E402
from sol.core.formats.adapter import adapter_tensors, load_adapter  # noqa: E402
from sol.core.formats.checkpoint import load_model  # noqa: E402
from sol.core.model import lora  # noqa: E402
from sol.core.train import pretrain  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = ["qwen2", "llama-gqa-tied", "gemma3"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _corpus(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "corpus.txt"
    src = SHARED / "tinyshakespeare.txt"
    f.write_text(src.read_text(encoding="utf-8")[:60_000] if src.is_file() else
                 "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 800, encoding="utf-8")
    return f


def _train_sol(tmp_path, folder, monkeypatch, steps=10, extra=()):
    """`sol train pretrain --model folder --lora` in-process; returns (losses, initial adapter, batches)."""
    seen = {"batches": []}
    prepare, micro = pretrain.Pretrain.prepare, pretrain.Pretrain.micro_batches

    def prepare_and_keep(self, *a, **k):
        prepare(self, *a, **k)
        seen["init"] = {k: v.clone() for k, v in adapter_tensors(self.model).items()}

    def micro_and_keep(self, *a, **k):
        out = micro(self, *a, **k)
        seen["batches"].append([b["rows"].clone() for b in out])
        return out

    monkeypatch.setattr(pretrain.Pretrain, "prepare", prepare_and_keep)
    monkeypatch.setattr(pretrain.Pretrain, "micro_batches", micro_and_keep)
    spec, args = stage_args("pretrain", [
        "--model", folder, "--corpus", _corpus(tmp_path), "--out", tmp_path / "adapter", "--lora",
        "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0, "--context", 32, "--batch-size", 4,
        "--max-steps", steps, "--lr", 1e-2, "--min-lr", 1e-2, "--warmup", 0, "--weight-decay", 0,
        "--grad-clip", 0, "--eval-every", 0, "--sample-every", 0, "--threads", 1,
        "--precision", "fp32", *extra])   # peft runs in float32; a CPU with bf16 would pick bf16 products
    events = []
    spec.run(args, events.append)
    return [e["loss"] for e in events if e["type"] == "step"], seen["init"], seen["batches"]


def _peft_losses(folder, init, batches, lr=1e-2, targets=LLAMA_TARGETS):
    import peft
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    peft.set_peft_model_state_dict(pm, init)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    out = []
    for micro in batches:
        total, count = 0.0, 0
        for rows in micro:
            logits = pm(input_ids=rows[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
            (loss / sum(r[:, 1:].numel() for r in micro)).backward()
            total += float(loss.detach())
            count += rows[:, 1:].numel()
        opt.step()
        opt.zero_grad()
        out.append(total / count)
    return pm, out


@pytest.mark.parametrize("family", FAMILIES)
def test_ten_lora_steps_match_peft_and_the_adapter_loads_in_peft(tmp_path, monkeypatch, family):
    import peft
    folder = tmp_path / family
    make_hf_model(family, folder, seed=0)
    sol_losses, init, batches = _train_sol(tmp_path, folder, monkeypatch)
    assert len(sol_losses) == 10 and sol_losses[-1] < sol_losses[0]
    pm, peft_losses = _peft_losses(folder, init, batches)
    assert max(abs(a - b) for a, b in zip(sol_losses, peft_losses)) < 1e-4, (sol_losses, peft_losses)

    # The adapter Sol wrote, loaded by peft on the transformers model, gives Sol's logits.
    out = tmp_path / "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"]
    assert sorted(config["target_modules"]) == sorted(LLAMA_TARGETS)
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 250, 3, 12]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf, out).eval()
    lm = load_model(folder)
    load_adapter(lm, out)
    lora.use(lm.model, lora.DEFAULT)
    with torch.no_grad():
        ref, mine = loaded(input_ids=ids).logits, lm.model(ids)
    assert (ref - mine).abs().max() < 1e-4
    # ...and trained it: the base alone gives other logits.
    lora.use(lm.model, None)
    with torch.no_grad():
        assert (lm.model(ids) - ref).abs().max() > 1e-3


def test_int8_base_trains_through_the_frozen_kernel(tmp_path, monkeypatch):
    """--quantize int8: the base's int8 products pass the gradient on (core/model/frozen.py), so the adapter
    learns about as it does on the float32 base."""
    folder = tmp_path / "qwen2"
    make_hf_model("qwen2", folder, seed=0)
    f32, _, _ = _train_sol(tmp_path / "a", folder, monkeypatch, steps=6)
    monkeypatch.undo()
    q8, _, _ = _train_sol(tmp_path / "b", folder, monkeypatch, steps=6, extra=["--quantize", "int8"])
    assert q8[-1] < q8[0]
    assert max(abs(a - b) for a, b in zip(f32, q8)) < 0.05 * f32[0]


def test_frozen_int8_gradient_equals_dequantized_products():
    from sol.core.model.quant import Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q = Int8Linear.from_linear(lin)
    w = q.float_rows()(0, 40)
    x = torch.randn(3, 5, 48, requires_grad=True)
    (q(x) * torch.arange(40.0)).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ((x2 @ w.T + lin.bias) * torch.arange(40.0)).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)


def test_peft_adapters_of_every_layout_load_with_their_logits(tmp_path):
    import peft
    for family, targets in (("gpt2", ["c_attn", "c_proj", "c_fc"]),
                            ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
                            ("qwen2", ["q_proj", "v_proj"])):
        folder = tmp_path / family
        hf = make_hf_model(family, folder, seed=1)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets,
                                                     init_lora_weights=False, fan_in_fan_out=family == "gpt2"))
        pm.save_pretrained(tmp_path / f"{family}-adapter")
        ids = torch.tensor([[1, 2, 3, 40, 50, 60]])
        lm = load_model(folder)
        load_adapter(lm, tmp_path / f"{family}-adapter", check_name=False)
        lora.use(lm.model, lora.DEFAULT)
        with torch.no_grad():
            assert (pm.eval()(input_ids=ids).logits - lm.model(ids)).abs().max() < 1e-4, family


def test_an_adapter_for_another_model_is_refused(tmp_path):
    import peft
    a, b = tmp_path / "a", tmp_path / "b"
    make_hf_model("qwen2", a, seed=0)
    make_hf_model("gpt2", b, seed=0)
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(a),
                             peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(a)
    with pytest.raises(SolError, match="base_model_name_or_path"):
        load_adapter(load_model(b), tmp_path / "ad")
    with pytest.raises(SolError, match="names a layer this gpt2 model does not have"):
        load_adapter(load_model(b), tmp_path / "ad", check_name=False)


@pytest.mark.parametrize("flags,match", [(["--lora", "--lora-r", "0"], "--lora-r 0"),
                                         (["--lora", "--lora-targets", "wq"], "--lora-targets 'wq'"),
                                         (["--quantize", "int8"], "only with --lora")])
def test_bad_lora_settings_are_one_error(tmp_path, flags, match):
    folder = tmp_path / "m"
    make_hf_model("qwen2", folder, seed=0)
    spec, args = stage_args("pretrain", ["--model", folder, "--corpus", _corpus(tmp_path), "--out", tmp_path / "o",
                                         "--max-steps", 1, "--context", 16, *flags])
    with pytest.raises(SolError, match=match):
        spec.run(args, lambda e: None)


def _trained_adapter(tmp_path, family, seed=0, adapter_seed=0):
    """A peft adapter with random (not zero) B on a tiny transformers model: (folder, adapter folder)."""
    import peft
    folder = tmp_path / family
    hf = make_hf_model(family, folder, seed=seed)
    hf.name_or_path = hf.config._name_or_path = str(folder)   # as from_pretrained(folder): peft writes it
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else LLAMA_TARGETS
    torch.manual_seed(adapter_seed)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                 fan_in_fan_out=family == "gpt2"))
    pm.save_pretrained(tmp_path / f"{family}-adapter")
    return folder, tmp_path / f"{family}-adapter", pm.eval()


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "gpt2"])
def test_merge_writes_a_folder_transformers_loads_with_the_adapters_logits(tmp_path, family, capsys):
    from sol.core.cli import main
    folder, ad, pm = _trained_adapter(tmp_path, family)
    out = tmp_path / "merged"
    assert main(["models", "merge", str(ad), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    ids = torch.tensor([[3, 9, 27, 81, 243, 7, 1]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - ref).abs().max() < 1e-4
        assert (load_model(out).model(ids) - ref).abs().max() < 1e-4
    if family != "gemma3":   # this tiny Gemma's query_pre_attn_scalar has no GGUF key (export says so)
        assert main(["models", "export", str(out), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    # An --out that holds something is never overwritten.
    capsys.readouterr()
    assert main(["models", "merge", str(ad), "--out", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


def test_adapter_flag_generates_what_the_merged_model_generates(tmp_path, capsys):
    from sol.core.cli import main
    folder, ad, _ = _trained_adapter(tmp_path, "qwen2")
    main(["models", "merge", str(ad), "--out", str(tmp_path / "merged")])
    capsys.readouterr()
    runs = {}
    for name, flags in (("adapter", ["--model", str(folder), "--adapter", str(ad)]),
                        ("adapter-as-model", ["--model", str(ad)]),
                        ("merged", ["--model", str(tmp_path / "merged")]), ("base", ["--model", str(folder)])):
        assert main(["generate", *flags, "--prompt", "hello", "--temperature", "0", "--max-tokens", "12",
                     "--json"]) == 0
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    assert runs["adapter"] == runs["merged"] == runs["adapter-as-model"] != runs["base"]


def test_models_list_shows_adapters_under_their_base(tmp_path, capsys, isolated_home):
    import shutil

    from sol.core.cli import main
    from sol.core.formats.registry import models_dir
    folder, ad, _ = _trained_adapter(tmp_path, "qwen2")
    models_dir().mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, models_dir() / "tiny-qwen")
    shutil.copytree(ad, models_dir() / "tiny-qwen-lora")
    cfg = json.loads((models_dir() / "tiny-qwen-lora" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/tiny-qwen"   # a hub id whose model name is the local folder's
    (models_dir() / "tiny-qwen-lora" / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["models", "list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    mine = [e for e in entries if e["name"] == "tiny-qwen-lora"]
    assert len(mine) == 1 and {k: mine[0][k] for k in ("name", "path", "format", "base")} == {
        "name": "tiny-qwen-lora", "path": str(models_dir() / "tiny-qwen-lora"), "format": "lora", "base": "tiny-qwen"}
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("tiny-qwen "))
    assert lines[i + 1].startswith("  tiny-qwen-lora") and "lora r=4" in lines[i + 1]


def test_serve_answers_each_adapter_id_with_its_own_adapter(tmp_path, capsys):
    """`sol serve --model BASE --adapter a=DIR --adapter b=DIR`: three model ids from one copy of the base,
    requests of all three decoded in one batch, each equal to `sol generate --adapter` (greedy)."""
    import concurrent.futures
    import shutil

    import openai
    from serve_helpers import ServerProcess

    from sol.core.cli import main
    folder, ad_a, _ = _trained_adapter(tmp_path / "a", "qwen2", seed=0)
    _, ad_b, _ = _trained_adapter(tmp_path / "b", "qwen2", seed=0, adapter_seed=1)
    shutil.rmtree(tmp_path / "b" / "qwen2")   # the same base; b's adapter has other random weights
    want = {}
    for name, flags in (("qwen2", []), ("a", ["--adapter", str(ad_a)]), ("b", ["--adapter", str(ad_b)])):
        capsys.readouterr()
        assert main(["generate", "--model", str(folder), *flags, "--prompt", "hello there", "--temperature", "0",
                     "--max-tokens", "16", "--json"]) == 0
        events = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
        # The tokens' log-probabilities: a tiny random model repeats one character, but each adapter moves them.
        want[name] = [e["logprob"] for e in events if e["type"] == "token"]
    assert len({tuple(round(x, 2) for x in v) for v in want.values()}) == 3
    srv = ServerProcess(["--model", str(folder), "--adapter", f"a={ad_a}", "--adapter", f"b={ad_b}"], tmp_path)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert sorted(m.id for m in client.models.list().data) == ["a", "b", "qwen2"]

        def ask(model):
            r = client.completions.create(model=model, prompt="hello there", max_tokens=16, temperature=0, logprobs=1)
            return r.choices[0].logprobs.token_logprobs
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, ["a", "b", "qwen2", "b", "a", "qwen2"]))
        for model, lp in zip(["a", "b", "qwen2", "b", "a", "qwen2"], got):
            assert len(lp) == 16 and max(abs(x - y) for x, y in zip(lp, want[model])) < 1e-3, model
    finally:
        srv.stop()


def test_serve_refuses_an_adapter_that_fits_no_model(tmp_path):
    import subprocess
    import sys
    _, ad, _ = _trained_adapter(tmp_path, "qwen2")
    other = tmp_path / "gpt2"
    make_hf_model("gpt2", other, seed=0)
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "serve", "--model", str(other), "--port", "0",
                        "--adapter", f"x={ad}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "fits none of the served models" in r.stderr


def test_a_lora_fine_tuned_model_chats_in_its_own_format(tmp_path, capsys):
    """sft --lora on a Qwen2 folder with ChatML, then `sol chat --model BASE --adapter DIR`: the answer it
    was taught, ended by the template's own end of turn (<|im_end|>), nothing added to the vocabulary."""
    from test_chat_template_training import family_folder

    from sol.core.cli import main
    folder = tmp_path / "qwen"
    hf = make_hf_model("qwen2", folder, seed=0)
    # Random init's token table (std 0.02) caps every logit near 1: a frozen head that small cannot make any
    # answer likely, whatever the adapter does. A table 30x as wide, as trained models' are.
    with torch.no_grad():
        for p in {id(p): p for p in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)}.values():
            p.mul_(30)
    hf.save_pretrained(folder)
    for f in family_folder(tmp_path, "chatml").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    chat = [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "It is 84."}]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(8)), encoding="utf-8")
    spec, args = stage_args("sft", ["--model", folder, "--data", data, "--out", tmp_path / "ad", "--lora",
                                    "--lora-r", 8, "--lora-alpha", 16, "--lora-dropout", 0, "--lr", 3e-2,
                                    "--min-lr", 3e-2, "--warmup", 0, "--max-steps", 40, "--batch-size", 4, "--val-fraction", 0,
                                    "--eval-every", 0, "--sample-every", 0, "--threads", 1])
    spec.run(args, lambda e: None)
    assert main(["plugins", "disable", "calculator"]) == 0   # the conversation as trained: no tools offered
    replies = {}
    for name, flags in (("adapter", ["--adapter", str(tmp_path / "ad")]), ("base", [])):
        capsys.readouterr()
        assert main(["chat", "--model", str(folder), *flags, "--message", "What is 12 times 7?", "--temperature",
                     "0", "--max-tokens", "12", "--json"]) == 0
        events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        replies[name] = [e for e in events if e["type"] == "message" and e["role"] == "assistant"][-1]
    assert replies["adapter"]["content"] == "It is 84." and replies["adapter"]["completion_tokens"] < 12
    assert replies["base"]["content"] != "It is 84."


@pytest.mark.parametrize("int8", [False, True])
def test_frozen_head_loss_equals_the_plain_loss_and_its_gradient(int8):
    """The chunked loss through a frozen head (core/train/losses.py) gives cross_entropy_sum's value and dL/dh,
    with ignored positions and a vocabulary limit, for a float and an int8 head."""
    from sol.core.model.quant import Int8Linear
    from sol.core.train import losses
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False).requires_grad_(False)
    if int8:
        head = Int8Linear.from_linear(head)
    h = torch.randn(70, 24, requires_grad=True)
    targets = torch.randint(0, 250, (70,))
    targets[::7] = losses.IGNORE
    old = losses.CHUNK_ELEMENTS
    losses.CHUNK_ELEMENTS = 300 * 16   # several chunks of rows, and of vocabulary for the int8 head
    try:
        fused = losses.FrozenHeadLoss.apply(h, head, targets, losses.IGNORE, 250)
    finally:
        losses.CHUNK_ELEMENTS = old
    (2 * fused).backward()
    h2 = h.detach().clone().requires_grad_(True)
    w = head.weight.float() if not int8 else head.float_rows()(0, 300)
    logits = h2 @ w.T
    logits[:, 250:] = float("-inf")
    plain = losses.cross_entropy_sum(logits, targets)
    (2 * plain).backward()
    assert abs(float(fused) - float(plain)) < 1e-4 * float(plain)
    assert torch.allclose(h.grad, h2.grad, atol=1e-5)


def test_frozen_head_loss_under_bf16_autocast_equals_the_plain_loss():
    """With bf16 products (a CPU with native bf16, or a GPU) the head's weight is cast once for all chunks: the
    same value and dL/dh as the plain path under the same autocast (logits in bf16, the loss in float32)."""
    from sol.core.train import losses
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False).requires_grad_(False)
    h = torch.randn(70, 24, requires_grad=True)
    targets = torch.randint(0, 250, (70,))
    targets[::7] = losses.IGNORE
    old = losses.CHUNK_ELEMENTS
    losses.CHUNK_ELEMENTS = 300 * 16
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = losses.FrozenHeadLoss.apply(h, head, targets, losses.IGNORE, 250)
            h2 = h.detach().clone().requires_grad_(True)
            logits = head(h2).float()
            logits[:, 250:] = float("-inf")
            plain = losses.cross_entropy_sum(logits, targets)
    finally:
        losses.CHUNK_ELEMENTS = old
    fused.backward()
    plain.backward()
    assert abs(float(fused) - float(plain)) < 1e-4 * float(plain)
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)   # dL/dh: the same bf16 product on both sides


def test_bad_adapters_are_one_error_line(tmp_path, capsys):
    """An adapter made for another model, by its name or by its shapes, is one `error:` line naming it."""
    from sol.core.cli import main
    folder, ad, _ = _trained_adapter(tmp_path, "qwen2")
    other = tmp_path / "other"
    make_hf_model("llama-untied", other, seed=0)     # another name, other shapes (4 key-value heads, not 2)
    same_shape = tmp_path / "twin"
    make_hf_model("qwen2", same_shape, seed=3)       # another name, the same shapes
    for model, why in ((other, "base_model_name_or_path"), (same_shape, "base_model_name_or_path")):
        capsys.readouterr()
        assert main(["generate", "--model", str(model), "--adapter", str(ad), "--prompt", "hi",
                     "--max-tokens", "2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0] and str(ad) in err[0]
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other)   # the name fits, the shapes do not
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["generate", "--model", str(other), "--adapter", str(ad), "--prompt", "hi", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not fit the model's" in err[0] and "adapter_model.safetensors" in err[0]


def test_recomputed_activations_train_the_same_adapter(tmp_path, monkeypatch):
    """--recompute (activation checkpointing, dropout included) takes the same steps as keeping them."""
    folder = tmp_path / "qwen2"
    make_hf_model("qwen2", folder, seed=0)
    kept, _, _ = _train_sol(tmp_path / "a", folder, monkeypatch, steps=4, extra=["--lora-dropout", "0.1"])
    monkeypatch.undo()
    again, _, _ = _train_sol(tmp_path / "b", folder, monkeypatch, steps=4, extra=["--lora-dropout", "0.1",
                                                                                  "--recompute"])
    assert max(abs(a - b) for a, b in zip(kept, again)) < 1e-5, (kept, again)
