"""The training loop and the four stages, on tiny data on the CPU."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sol.core.train.stages import builtin_stages

REPO = Path(__file__).resolve().parents[1]


def stage_args(name: str, argv: list) -> argparse.Namespace:
    spec = next(s for s in builtin_stages() if s.name == name)
    p = argparse.ArgumentParser()
    spec.add_arguments(p)
    return spec, p.parse_args([str(a) for a in argv])


def run_stage(name: str, argv: list) -> tuple[dict, list[dict]]:
    """The run's events from `start` on (the `progress` events of preparing the data come before it;
    tests/test_hostile_training_inputs.py checks them)."""
    spec, args = stage_args(name, [*argv, "--threads", "1"])
    events = []
    done = spec.run(args, events.append)
    return done, [e for e in events if e["type"] != "progress"]


def losses(events):
    return [e["loss"] for e in events if e["type"] == "step"]


def falls(ls, k=5):
    return sum(ls[-k:]) / k < sum(ls[:k]) / k


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny base model pretrained on Shakespeare-like text plus calculator chats, then SFT on those chats."""
    from sol.core.data import synthetic
    from sol.core.train.recipe import _render_chats
    d = tmp_path_factory.mktemp("pipe")
    from conftest import TINY_TEXT
    (d / "text.txt").write_text(TINY_TEXT, encoding="utf-8")
    (d / "chats.txt").write_text(_render_chats(synthetic.generate("sft", 300, 9)), encoding="utf-8")
    synthetic.write("sft", 600, 1, d / "sft.jsonl")
    synthetic.write("prefs", 200, 2, d / "prefs.jsonl")
    synthetic.write("rl", 200, 3, d / "rl.jsonl")
    synthetic.write("rl", 32, 4, d / "rl_eval.jsonl")
    model = ["--layers", 2, "--heads", 2, "--d-model", 64, "--context", 96]
    base = run_stage("pretrain", ["--corpus", d / "text.txt", "--corpus", d / "chats.txt", "--out", d / "base",
                                  *model, "--max-steps", 60, "--batch-size", 16, "--lr", 3e-3, "--warmup", 5,
                                  "--eval-every", 30, "--sample-every", 0, "--checkpoint-every", 0])
    sft = run_stage("sft", ["--model", d / "base", "--data", d / "sft.jsonl", "--out", d / "sft", "--max-steps", 150,
                            "--batch-size", 16, "--lr", 3e-3, "--warmup", 5, "--eval-every", 75,
                            "--sample-every", 0, "--checkpoint-every", 0])
    return {"dir": d, "base": base, "sft": sft}


def test_pretrain_loss_falls_and_records_lineage(pipeline):
    done, events = pipeline["base"]
    assert falls(losses(events))
    start = events[0]
    assert start["type"] == "start" and start["device"]["type"] == "cpu" and start["parameters"] > 0
    evals = [e for e in events if e["type"] == "eval"]
    assert evals and evals[-1]["val_loss"] < math.log(start["config"]["model"]["vocab_size"])
    meta = json.loads((pipeline["dir"] / "base" / "sol.json").read_text())
    assert meta["stage"] == "base" and meta["steps"] == 60 and meta["parent"] is None
    assert [len(f["sha256"]) for f in meta["data"]] == [64, 64]
    assert meta["metrics"]["val_loss"] == evals[-1]["val_loss"]
    # the memmaps: uint16 ids, documents joined by <|endoftext|>
    from sol.core.data import corpus
    from sol.core.formats.tokenizer import Tokenizer
    train, val, m = corpus.load(pipeline["dir"] / "base" / "data")
    tok = Tokenizer.from_file(pipeline["dir"] / "base" / "tokenizer.json")
    assert train.dtype.name == "uint16" and len(val) > 0
    assert int((train == tok.token_to_id("<|endoftext|>")).sum()) >= 1


def test_sft_loss_falls_and_keeps_lineage(pipeline):
    done, events = pipeline["sft"]
    assert falls(losses(events))
    meta = json.loads((pipeline["dir"] / "sft" / "sol.json").read_text())
    assert meta["stage"] == "sft" and meta["parent"]["path"] == str((pipeline["dir"] / "base").resolve())
    assert meta["parent"]["sha256"] and meta["data"][0]["sha256"]
    assert meta["tools"] == ["calculator"]   # the data's chats call it: `sol serve` runs it for this model


def test_reward_loss_equals_formula():
    from sol.core.train.reward import pair_loss
    rc, rr = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 1.5, -2.0])
    expect = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(rc.tolist(), rr.tolist()))
    assert float(pair_loss(rc, rr)) == pytest.approx(expect, rel=1e-6)


@pytest.fixture(scope="module")
def reward_run(pipeline):
    d = pipeline["dir"]
    return run_stage("reward", ["--model", d / "sft", "--data", d / "prefs.jsonl", "--out", d / "rm",
                                "--max-steps", 40, "--batch-size", 16, "--lr", 1e-3, "--warmup", 2,
                                "--eval-every", 40, "--checkpoint-every", 0])


def test_reward_stage_learns_and_saves_head(pipeline, reward_run):
    d = pipeline["dir"]
    done, events = reward_run
    ls = losses(events)
    assert ls[0] == pytest.approx(math.log(2), abs=1e-4)     # zero head: every answer scores the same
    assert falls(ls)
    acc = [e["accuracy"] for e in events if e["type"] == "eval"][-1]
    assert acc > 0.6
    from sol.core.formats.checkpoint import load_model
    lm = load_model(d / "rm")
    assert set(lm.extra_tensors) == {"reward_head.weight", "reward_head.bias"}
    assert json.loads((d / "rm" / "sol.json").read_text())["stage"] == "rm"


def test_group_advantage_and_k3():
    from sol.core.train.rl import group_advantages, k3_kl
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3, False)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.5])
    assert torch.allclose(k3_kl(logp, ref), torch.exp(ref - logp) - (ref - logp) - 1)
    assert float(k3_kl(logp, ref)[0]) == 0.0


def test_rollout_forces_tool_results_and_marks_them(pipeline):
    """Whatever the model samples, a closed calculator call is followed by the forced, marked result."""
    from sol.core.formats.checkpoint import load_model
    from sol.core.train.rollout import rollout
    lm = load_model(pipeline["dir"] / "sft")
    tok = lm.tokenizer
    prompt = tok.encode_ids("<|user|>what is 12 times 7?<|end|><|assistant|><|tool_call|>calculator: 12*7")
    end = tok.token_to_id("<|tool_end|>")
    # Make the model close the call at once by biasing its output towards <|tool_end|> for one step.
    model = lm.model
    bias = torch.zeros(model.cfg.vocab_size)
    bias[end] = 100.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias if o.shape[1] == len(prompt) else o)
    r = rollout(model, tok, [prompt], 12, 0.0, torch.Generator().manual_seed(0), (tok.token_to_id("<|end|>"),))[0]
    forced_text = tok.decode([t for t, f in zip(r.ids, r.forced) if f])
    assert r.ids[0] == end and not r.forced[0] and r.tool_calls == 1
    assert forced_text == "<|tool_result|>84<|tool_end|>"
    assert r.forced[1:5] == [True, True, True, True]


def test_rl_raises_mean_reward(pipeline, reward_run):
    """A tiny model cannot do the arithmetic copying yet, so the reward here is the reward model's score
    (continuous, so every group of samples has something to compare); the starter recipe uses the
    verifiable calculator reward and is checked on 200 held-out prompts."""
    d = pipeline["dir"]
    done, events = run_stage("rl", ["--model", d / "sft", "--prompts", d / "rl.jsonl", "--eval-prompts",
                                    d / "rl_eval.jsonl", "--reward-model", d / "rm", "--out", d / "rl",
                                    "--max-steps", 16, "--batch-size", 8, "--samples", 8, "--lr", 3e-3, "--normalize-std",
                                    "--warmup", 1, "--beta", 0.01, "--eval-every", 8, "--sample-every", 0,
                                    "--checkpoint-every", 0, "--max-new-tokens", 40, "--seed", 1])
    rewards = [e["reward_mean"] for e in events if e["type"] == "step"]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4, rewards
    assert json.loads((d / "rl" / "sol.json").read_text())["stage"] == "rl"
    # The step that did best on the eval prompts is kept in rl/best, with its step and accuracy.
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [8, 16]
    first_best = max(evals, key=lambda e: (e["accuracy"], -e["step"]))
    best = json.loads((d / "rl" / "best" / "sol.json").read_text())
    assert (best["step"], best["metrics"]["accuracy"]) == (first_best["step"], first_best["accuracy"])


# ---- resume, signals, DDP (real processes) ----------------------------------
def sol(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "sol.core.cli", *map(str, args)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def read_events(path):
    """An --events file's events, `progress` ones left out (as run_stage)."""
    events = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return [e for e in events if e["type"] != "progress"]


def pretrain_argv(corpus, out, steps=40, extra=()):
    return ["train", "pretrain", "--corpus", corpus, "--out", out, "--layers", 2, "--heads", 2, "--d-model", 32,
            "--context", 32, "--batch-size", 8, "--max-steps", steps, "--lr", 3e-3, "--warmup", 5,
            "--eval-every", steps, "--sample-every", 0, "--threads", 1, *extra]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_text_file):
    # Long enough (300 steps) that the kill lands mid-run however fast this machine takes 10 steps.
    steps = 300
    full = sol(*pretrain_argv(tiny_text_file, tmp_path / "full", steps, extra=["--events", tmp_path / "full.jsonl"]))
    run = sol(*pretrain_argv(tiny_text_file, tmp_path / "cut", steps, extra=["--checkpoint-every", 10,
                                                                            "--events", tmp_path / "cut1.jsonl"]))
    deadline = time.time() + 120
    while time.time() < deadline:
        evs = read_events(tmp_path / "cut1.jsonl") if (tmp_path / "cut1.jsonl").exists() else []
        if any(e["type"] == "checkpoint" and e["step"] >= 20 for e in evs) or run.poll() is not None:
            break
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert full.wait(timeout=180) == 0
    ckpt_step = max(e["step"] for e in read_events(tmp_path / "cut1.jsonl") if e["type"] == "checkpoint")
    assert 20 <= ckpt_step < steps
    resumed = sol(*pretrain_argv(tiny_text_file, tmp_path / "cut", steps, extra=["--resume", "--checkpoint-every", 10,
                                                                                "--events", tmp_path / "cut2.jsonl"]))
    assert resumed.wait(timeout=180) == 0
    ev_full, ev_res = read_events(tmp_path / "full.jsonl"), read_events(tmp_path / "cut2.jsonl")
    assert ev_res[0]["type"] == "start" and ev_res[0]["step"] == ckpt_step
    first = next(e for e in ev_res if e["type"] == "step")
    same = next(e for e in ev_full if e["type"] == "step" and e["step"] == first["step"])
    assert first["step"] == ckpt_step + 1 and first["lr"] == pytest.approx(same["lr"], rel=1e-9)
    assert first["loss"] == pytest.approx(same["loss"], abs=1e-3)
    val = [e["val_loss"] for e in ev_full if e["type"] == "eval"][-1]
    val_res = [e["val_loss"] for e in ev_res if e["type"] == "eval"][-1]
    assert val_res == pytest.approx(val, abs=1e-2)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, tiny_text_file):
    p = sol(*pretrain_argv(tiny_text_file, tmp_path / "run", steps=100000, extra=["--checkpoint-every", 0,
                                                                                  "--events", "-"]),
            stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if json.loads(line)["type"] == "step":
            break
    p.send_signal(signal.SIGTERM)
    rest = [json.loads(x) for x in p.stdout]
    assert p.wait(timeout=60) == 0
    done = rest[-1]
    assert done["type"] == "done" and done["stopped"] is True
    ckpt = [e for e in rest if e["type"] == "checkpoint"][-1]
    assert ckpt["step"] == done["step"] and (Path(ckpt["path"]) / "trainer.pt").is_file()


def test_torchrun_two_processes_match_one(tmp_path, tiny_text_file):
    common = ["--max-steps", 3, "--batch-size", 8, "--eval-every", 0, "--warmup", 1]
    one = sol(*pretrain_argv(tiny_text_file, tmp_path / "one", extra=[*common, "--events", tmp_path / "one.jsonl"]))
    assert one.wait(timeout=180) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), "-m", "sol.core.cli",
                          *map(str, pretrain_argv(tiny_text_file, tmp_path / "two",
                                                  extra=[*common, "--events", tmp_path / "two.jsonl"]))],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    l1 = [e["loss"] for e in read_events(tmp_path / "one.jsonl") if e["type"] == "step"]
    l2 = [e["loss"] for e in read_events(tmp_path / "two.jsonl") if e["type"] == "step"]
    start = read_events(tmp_path / "two.jsonl")[0]
    assert start["world_size"] == 2 and len(l1) == len(l2) == 3
    assert all(abs(a - b) < 1e-4 for a, b in zip(l1, l2)), (l1, l2)


def test_recipe_runs_the_four_stages_and_compares_sft_with_rl(tmp_path, tiny_text_file):
    """`sol train recipe starter`, every stage's steps scaled to 2 %: the stages run in order, RL reads
    its own validation prompts (never the held-out ones), and the final sol.json compares SFT and RL
    on the 200 held-out prompts."""
    events_file = tmp_path / "events.jsonl"
    run = sol("train", "recipe", "starter", "--corpus", tiny_text_file, "--out", tmp_path / "starter",
              "--work", tmp_path / "work", "--scale", 0.02, "--threads", 1, "--events", events_file)
    assert run.wait(timeout=600) == 0
    events = read_events(events_file)
    done = [e["recipe_stage"] for e in events if e["type"] == "done" and not e.get("final", True)]
    assert done == ["pretrain", "sft", "reward", "rl"]
    work = tmp_path / "work"
    held = {json.loads(x)["prompt"] for x in (work / "eval.jsonl").read_text().splitlines()}
    val = {json.loads(x)["prompt"] for x in (work / "rl_val.jsonl").read_text().splitlines()}
    assert len(held) == len(val) == 200 and not held & val
    rl_meta = json.loads((work / "rl" / "sol.json").read_text())
    assert [Path(f["path"]).name for f in rl_meta["data"]] == ["rl.jsonl", "rl_val.jsonl"]
    meta = json.loads((tmp_path / "starter" / "sol.json").read_text())
    assert meta["recipe"] == "starter" and meta["held_out"]["prompts"] == 200
    assert 0 <= meta["held_out"]["sft_accuracy"] <= 1 and 0 <= meta["held_out"]["rl_accuracy"] <= 1
    assert [e for e in events if e["type"] == "done"][-1]["final"] is True
