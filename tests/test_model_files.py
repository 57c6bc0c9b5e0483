"""Model directories: bad files give one `error:` line naming the file; models are found on disk."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import torch
from conftest import make_tiny_model

from sol.core.cli import main
from sol.core.formats.checkpoint import load_model, save_model


def run_cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, names):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert names in lines[0], f"{names!r} not named in: {lines[0]}"


def generate_args(path):
    return ["generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "2"]


def test_truncated_safetensors(tiny_model, capsys):
    f = tiny_model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(*run_cli(generate_args(tiny_model), capsys)[::2], names=str(f))


def test_corrupt_safetensors_header(tiny_model, capsys):
    f = tiny_model / "model.safetensors"
    f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
    assert_one_line_error(*run_cli(generate_args(tiny_model), capsys)[::2], names=str(f))


def test_missing_tokenizer(tiny_model, capsys):
    (tiny_model / "tokenizer.json").unlink()
    assert_one_line_error(*run_cli(generate_args(tiny_model), capsys)[::2], names="tokenizer.json")


def test_shapes_that_do_not_match_the_config(tiny_model, capsys):
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["d_ff"] = cfg["d_ff"] * 2
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(generate_args(tiny_model), capsys)
    assert_one_line_error(rc, err, names="model.safetensors")
    assert "mlp.fc.weight" in err and "shape" in err


def test_a_directory_with_only_a_pickle_that_runs_code(tmp_path, capsys):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50, "n_positions": 16,
                                               "n_embd": 8, "n_layer": 1, "n_head": 2}))
    shutil.copy(make_tiny_model(tmp_path / "t") / "tokenizer.json", d / "tokenizer.json")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    rc, _, err = run_cli(generate_args(d), capsys)
    assert_one_line_error(rc, err, names="pytorch_model.bin")
    assert not marker.exists(), "the pickle's code ran"


def test_a_pickle_of_plain_tensors_loads_with_weights_only(tmp_path):
    src = make_tiny_model(tmp_path / "t")
    lm = load_model(src)
    d = tmp_path / "as-bin"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "sol.json"):
        shutil.copy(src / name, d / name)
    sd = {k: v for k, v in lm.model.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, d / "pytorch_model.bin")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(load_model(d).model(x), lm.model(x))


def test_a_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(generate_args(tmp_path / "empty"), capsys)[::2], names="config.json")


def test_bad_json_config_names_the_line(tiny_model, capsys):
    (tiny_model / "config.json").write_text('{\n  "n_layer": 2,\n  oops\n}')
    assert_one_line_error(*run_cli(generate_args(tiny_model), capsys)[::2], names="config.json: invalid JSON at line 3")


def test_bad_argument_is_one_line(tiny_model, capsys):
    rc, _, err = run_cli(generate_args(tiny_model) + ["--top-p", "1.5"], capsys)
    assert_one_line_error(rc, err, names="--top-p")


def test_debug_shows_the_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "generate", "--model", str(tmp_path / "nope"),
                        "--prompt", "x", "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_save_is_atomic_and_roundtrips(tmp_path):
    src = make_tiny_model(tmp_path / "a")
    lm = load_model(src)
    out = save_model(tmp_path / "b", lm.model, lm.tokenizer, {"stage": "sft", "parent": str(src)})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sol.json", "tokenizer.json"]
    meta = json.loads((out / "sol.json").read_text())
    assert meta["stage"] == "sft" and meta["parameters"] == lm.model.num_parameters()
    x = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(load_model(out).model(x), lm.model(x))


# ---- finding models on disk ----------------------------------------------------
def hf_cache_model(home, repo, family="gpt2"):
    from hf_models import make_hf_model
    base = home / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "abc123"
    make_hf_model(family, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    return snap


def test_models_list_finds_sol_and_hf_cache_models(isolated_home, capsys):
    make_tiny_model(isolated_home / "models" / "my-model")
    snap = hf_cache_model(isolated_home, "someone/tiny-llama", "llama-gqa-tied")
    bert = isolated_home / "hf" / "hub" / "models--x--bert" / "snapshots" / "1"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, out, _ = run_cli(["models", "list", "--json"], capsys)
    assert rc == 0
    models = {m["name"]: m for m in json.loads(out)}
    assert set(models) >= {"my-model", "someone/tiny-llama"}
    assert "x/bert" not in models
    mine, hf = models["my-model"], models["someone/tiny-llama"]
    assert mine["format"] == "sol" and mine["parameters"] == load_model(mine["path"]).model.num_parameters()
    assert hf["format"] == "hf" and hf["architecture"] == "llama" and hf["path"] == str(snap)
    for m in (mine, hf):
        assert set(m) == {"name", "path", "format", "architecture", "parameters"}
    # a name from the list works wherever --model is taken
    rc, out, _ = run_cli(["generate", "--model", "someone/tiny-llama", "--prompt", "It is", "--max-tokens", "3",
                          "--temperature", "0", "--json"], capsys)
    assert rc == 0 and json.loads(out.splitlines()[-1])["completion_tokens"] == 3


def test_models_list_finds_a_bin_only_hf_cache_repo(isolated_home, capsys):
    """A snapshot with only pytorch_model.bin (older repos) is listed, with its parameter count, and loads by name."""
    import transformers
    snap = hf_cache_model(isolated_home, "someone/old-llama", "llama-untied")
    ref = transformers.AutoModelForCausalLM.from_pretrained(snap)
    torch.save(ref.state_dict(), snap / "pytorch_model.bin")
    (snap / "model.safetensors").unlink()
    with open(snap / "training_args.bin", "wb") as f:   # a fine-tune's settings, pickled: not weights
        pickle.dump({"learning_rate": 1e-5, "output_dir": "out"}, f)
    rc, out, _ = run_cli(["models", "list", "--json"], capsys)
    models = {m["name"]: m for m in json.loads(out)}
    assert "someone/old-llama" in models, models
    m = models["someone/old-llama"]
    assert m["format"] == "hf" and m["architecture"] == "llama" and m["path"] == str(snap)
    assert m["parameters"] == sum(p.numel() for p in ref.state_dict().values())
    rc, out, _ = run_cli(["generate", "--model", "someone/old-llama", "--prompt", "It is", "--max-tokens", "2",
                          "--temperature", "0", "--json"], capsys)
    assert rc == 0 and json.loads(out.splitlines()[-1])["completion_tokens"] == 2


def test_tokenize_json_is_exactly_what_tokenizers_encodes(tiny_model, capsys):
    from tokenizers import Tokenizer
    text = "Olá 世界 🌍 <|endoftext|> speak"
    rc, out, _ = run_cli(["tokenize", "--model", str(tiny_model), "--text", text, "--json"], capsys)
    got = json.loads(out)
    ref = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(text)
    assert rc == 0 and got == {"ids": ref.ids, "tokens": ref.tokens, "offsets": [list(o) for o in ref.offsets]}


def test_sol_console_script_runs(tiny_model):
    exe = shutil.which("sol")
    assert exe, "the `sol` console script is not installed"
    r = subprocess.run([exe, "generate", "--model", str(tiny_model), "--prompt", "All", "--max-tokens", "4",
                        "--temperature", "0", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["type"] == "done"
