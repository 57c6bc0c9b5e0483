"""`sol eval`: multiple choice as lm-evaluation-harness's `hf` model scores it, strided perplexity as
transformers computes it, exact answers through the chat, results kept with the model, one `error:` line
for bad input, and a run that SIGTERM stops cleanly."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from hf_models import make_hf_model
from sol.core.cli import main

ROWS = [{"question": "The cat sat on the", "choices": ["mat", "moon", "dog"], "answer": 0},
        {"question": "One two three", "choices": ["four", "five"], "answer": 0},
        {"question": "Red green", "choices": ["blue", "cat", "seven and eight"], "answer": 2},
        {"question": "To be or not to ", "choices": ["be", "go"], "answer": 0},
        {"question": "Hello", "choices": ["world", "there", "you"], "answer": 1},
        {"question": "A rose by any other name would smell as", "choices": ["sweet", "sour", "café 世界"],
         "answer": 0},
        {"question": "Olá", "choices": ["naïve", "coöperation", "Juliet is the sun"], "answer": 2},
        # a long choice: lowest in total, highest per character (acc and acc_norm part)
        {"question": "Romeo:", "choices": ["q", "It is the east, and Juliet is the sun."], "answer": 1}]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "tinygpt2"
    model = make_hf_model("gpt2", folder)
    # lm-evaluation-harness's hf model pads with an end-of-text token.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<unused0>", "pad_token": "<unused0>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder, model


def sol(args, capsys) -> tuple[int, list[str], str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_choice_equals_lm_eval_hf(hf_folder, tmp_path, monkeypatch, capsys):
    """Accuracy, normalised accuracy and every choice's log-likelihood as the harness's `hf` model gives them
    on a task YAML over the same JSONL (offline)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    folder, _ = hf_folder
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}.items():
        monkeypatch.setenv(k, v)
    data = write_rows(tmp_path / "mc.jsonl", ROWS)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sol_mc.yaml").write_text(
        "task: sol_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["sol_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  log_samples=True, batch_size=1, device="cpu")
    samples = sorted(out["samples"]["sol_mc"], key=lambda s: s["doc_id"])
    want = [[r[0][0] for r in s["resps"]] for s in samples]
    rc, lines, err = sol(["eval", "choice", "--model", str(folder), "--data", str(data), "--json"], capsys)
    assert rc == 0, err
    rows = [json.loads(x) for x in lines]
    assert [r["i"] for r in rows[:-1]] == list(range(len(ROWS)))
    worst = max(abs(g - w) for r, ws in zip(rows, want) for g, w in zip(r["loglikelihoods"], ws))
    assert worst < 1e-4, worst
    for r, s in zip(rows, samples):
        assert (r["acc"], r["acc_norm"]) == (s["acc"], s["acc_norm"])
    last = rows[-1]
    assert set(last) == {"task", "model", "n", "accuracy", "accuracy_norm"}
    assert last["n"] == len(ROWS)
    assert last["accuracy"] == pytest.approx(out["results"]["sol_mc"]["acc,none"], abs=1e-9)
    assert last["accuracy_norm"] == pytest.approx(out["results"]["sol_mc"]["acc_norm,none"], abs=1e-9)
    # the plain and the normalised choice differ on some question here, so both are really checked
    assert any(r["acc"] != r["acc_norm"] for r in rows[:-1])
    kept = json.loads((folder / "evals" / "choice-mc.json").read_text())
    assert kept["accuracy"] == last["accuracy"] and kept["data_sha256"] == hashlib_sha256(data)
    print(f"max |delta loglikelihood| vs lm-eval hf: {worst:.2e}")


def hashlib_sha256(path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hf_strided_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Hugging Face's strided-perplexity recipe (docs: "Perplexity of fixed-length models"), summed per token."""
    x = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            logits = model(inp).logits.double()
        lp = torch.log_softmax(logits[0, :-1], -1)
        tgt = labels[0, 1:]
        keep = tgt != -100
        total -= float(lp[keep].gather(-1, tgt[keep][:, None]).sum())
        count += int(keep.sum())
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("window,stride", [(48, 20), (32, 31), (None, None)])
def test_perplexity_equals_transformers(hf_folder, tmp_path, capsys, window, stride):
    from transformers import PreTrainedTokenizerFast
    folder, model = hf_folder
    text = ("It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious moon. "
            "Olá, café! 世界 🌍 naïve coöperation. ") * 6
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    ids = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))(text)["input_ids"]
    assert len(ids) > 128 * 1.5   # longer than every window, the model's context (128) included
    nll, count = hf_strided_nll(model, ids, window or 128, stride or (window or 128) // 2)
    args = ["eval", "perplexity", "--model", str(folder), "--data", str(tmp_path / "held.txt"), "--json", "--no-save"]
    args += ["--window", str(window), "--stride", str(stride)] if window else []
    rc, lines, err = sol(args, capsys)
    assert rc == 0, err
    got = json.loads(lines[-1])
    assert set(got) == {"task", "model", "tokens", "perplexity", "nll"}
    assert got["tokens"] == count == len(ids) - 1
    want = math.exp(nll / count)
    assert abs(got["perplexity"] / want - 1) < 1e-4, (got, want)
    assert got["nll"] == pytest.approx(nll / count, rel=1e-4)
    print(f"window {window}: perplexity {got['perplexity']:.6f} vs transformers {want:.6f}, "
          f"relative {abs(got['perplexity'] / want - 1):.1e}")


def test_an_adapters_perplexity_is_peft_s_and_is_kept_beside_the_adapter(tmp_path, capsys):
    """--model ADAPTER (loaded on its base) and --model BASE --adapter ADAPTER: the perplexity of peft's model,
    the result in the adapter's folder, none in the base's."""
    import peft
    folder = tmp_path / "base"
    hf = make_hf_model("gpt2", folder, seed=4)
    hf.name_or_path = hf.config._name_or_path = str(folder)   # as from_pretrained(folder): peft writes it
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                 init_lora_weights=False, fan_in_fan_out=True)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    text = tmp_path / "held.txt"
    text.write_text("It is the east, and Juliet is the sun. Olá, café! 世界 🌍 naïve coöperation. " * 4)
    from sol.core.formats.tokenizer import Tokenizer
    ids = Tokenizer.from_file(folder / "tokenizer.json").encode_ids(text.read_text())
    nll, count = hf_strided_nll(pm, ids, 40, 16)
    adapter = str(tmp_path / "adapter")
    for args in (["--model", adapter], ["--model", str(folder), "--adapter", adapter]):
        rc, lines, err = sol(["eval", "perplexity", *args, "--data", str(text), "--window", "40", "--stride", "16",
                              "--json"], capsys)
        assert rc == 0, err
        got = json.loads(lines[-1])
        assert got["tokens"] == count and abs(got["perplexity"] / math.exp(nll / count) - 1) < 1e-4
    assert (tmp_path / "adapter" / "evals" / "perplexity-held.json").is_file()
    assert not (folder / "evals").exists()


def test_windows_score_every_token_once():
    from sol.core.evaluate.perplexity import windows
    for n, w, s in [(10, 4, 2), (100, 48, 20), (7, 7, 3), (50, 8, 7), (9, 3, 1), (9, 2, 1)]:
        scored = set()
        for begin, end, k in windows(n, w, s):
            new = set(range(end - k, end))
            assert not (new & scored) and end - begin <= w and end - k > begin
            scored |= new
        assert scored == set(range(1, n))


def one_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_gets_one_error_line(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder
    bad = write_rows(tmp_path / "nochoices.jsonl", [ROWS[0], {"question": "x", "answer": 0}])
    rc, _, err = sol(["eval", "choice", "--model", str(folder), "--data", str(bad)], capsys)
    assert rc == 1 and f"{bad}:2" in one_error(err) and "choices" in err
    bad = write_rows(tmp_path / "range.jsonl", [ROWS[0], ROWS[1],
                                                {"question": "x", "choices": ["a", "b"], "answer": 2}])
    rc, _, err = sol(["eval", "choice", "--model", str(folder), "--data", str(bad)], capsys)
    assert rc == 1 and f"{bad}:3" in one_error(err) and "out of range" in err
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    rc, _, err = sol(["eval", "perplexity", "--model", str(folder), "--data", str(short)], capsys)
    assert rc == 1 and str(short) in one_error(err) and "at least two tokens" in err
    good = write_rows(tmp_path / "good.jsonl", ROWS)
    rc, _, err = sol(["eval", "choice", "--model", "no-such-model", "--data", str(good)], capsys)
    assert rc == 1 and "--model no-such-model" in one_error(err)
    rc, _, err = sol(["eval", "choice", "--model", str(folder), "--data", str(tmp_path / "missing.jsonl")], capsys)
    assert rc == 1 and "missing.jsonl" in one_error(err)
    rc, _, err = sol(["eval", "perplexity", "--model", str(folder), "--data", str(tmp_path / "range.jsonl"),
                      "--window", "1000"], capsys)
    assert rc == 1 and "--window 1000" in one_error(err)
    rc, _, err = sol(["eval", "perplexity", "--model", str(folder), "--data", str(tmp_path / "range.jsonl"),
                      "--window", "16", "--stride", "16"], capsys)
    assert rc == 1 and "--stride 16" in one_error(err)


def test_exact_runs_the_calculator_through_the_chat(tmp_path, capsys):
    data = write_rows(tmp_path / "arith.jsonl", [{"prompt": "what is 12 times 7?", "answer": 84},
                                                 {"prompt": "what is 12 times 7?", "answer": "85"}])
    rc, lines, err = sol(["eval", "exact", "--model", "starter", "--data", str(data), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(lines[-1]) == {"task": "exact", "model": "starter", "n": 2, "exact": 0.5}
    # the shipped model's folder is not Sol's to write: the result goes under Sol's data folder
    from sol.core.formats.registry import data_dir
    assert (data_dir() / "evals" / "starter" / "exact-arith.json").is_file()


def test_whole_word_or_number():
    from sol.core.evaluate.exact import contains
    assert contains("12 times 7 is 84.", "84") and contains("84", "84") and contains("(84)", "84")
    assert not contains("840", "84") and not contains("8.84", "84") and not contains("84.5", "84")
    assert contains("The capital is Paris!", "paris") and not contains("Parisian", "Paris")


def test_results_across_checkpoints_and_lineage(tmp_path, tiny_text_file):
    """A parent, a run's checkpoints and the run: each one's results, oldest first, for the bar chart."""
    from conftest import make_tiny_model
    from sol.core.evaluate import results
    from sol.core.evaluate.run import evaluate
    from sol.core.formats.checkpoint import load_model
    base = make_tiny_model(tmp_path / "base")
    run = make_tiny_model(tmp_path / "run")
    meta = json.loads((run / "sol.json").read_text())
    (run / "sol.json").write_text(json.dumps({**meta, "stage": "sft", "parent": {"path": str(base), "name": "base",
                                                                              "stage": "base"}}))
    ckpt = make_tiny_model(run / "checkpoints" / "step_000010")
    for path in (base, ckpt, run):
        evaluate("perplexity", load_model(path), tiny_text_file, window=32)
    chart = results.across(run)
    assert [m["path"] for m in chart] == [str(base), str(ckpt), str(run)]
    assert [m["step"] for m in chart][1] == 10
    assert all(len(m["results"]) == 1 and m["results"][0]["task"] == "perplexity" for m in chart)
    assert (run / "evals" / "perplexity-tiny.json").is_file()


def test_cancel_keeps_nothing(tiny_model, tiny_text_file):
    from sol.core.evaluate.run import Cancelled, evaluate
    from sol.core.formats.checkpoint import load_model
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done == 2:
            cancel.set()
    with pytest.raises(Cancelled) as e:
        evaluate("perplexity", load_model(tiny_model), tiny_text_file, window=8, stride=4, progress=progress,
                 cancel=cancel)
    assert e.value.done == 2 and seen == [0, 1, 2] and not (tiny_model / "evals").exists()


def test_sigterm_stops_eval_cleanly_with_events(tiny_model, tmp_path):
    """The GUI's child process: JSON events on stdout, SIGTERM between two windows, exit 130, no result kept."""
    text = tmp_path / "long.txt"
    text.write_text("Before we proceed any further, hear me speak. " * 400, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "sol.core.cli", "eval", "perplexity", "--model", str(tiny_model),
                             "--data", str(text), "--window", "64", "--stride", "1", "--events", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    first = json.loads(proc.stdout.readline())
    assert first["type"] == "start" and first["task"] == "perplexity"
    for line in proc.stdout:
        ev = json.loads(line)
        assert ev["type"] == "progress"
        if ev["done"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    rest = [json.loads(x) for x in proc.stdout.read().splitlines()]
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == 130, err
    assert rest[-1]["type"] == "done" and rest[-1]["cancelled"] and rest[-1]["done"] < rest[-1]["total"]
    assert "cancelled after" in one_error(err)
    assert not (tiny_model / "evals").exists()
