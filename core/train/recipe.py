"""`sol train recipe starter`: the four stages in order, the way Sol's starter model is made.
`sol train recipe words`: one pretraining run with a byte-level BPE vocabulary, the way the `words`
model is made (a model whose tokens are mostly whole words, so its embeddings can be explored).

    synthetic data -> pretrain (tinyshakespeare + rendered calculator chats, char tokenizer)
                   -> sft (calculator conversations) -> reward (preference pairs)
                   -> rl (the verifiable calculator reward, KL to SFT)

RL uses the calculator reward rather than the reward model: a program that
checks the number cannot be fooled, and the reward model (its held-out
pairwise accuracy is in sol.json) stays for `sol train rl --reward-model`.

The stages run in a work folder; the final RL model is copied into --out
with a sol.json that records every stage and the held-out accuracies of the
SFT and RL models on the same prompts.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..atomic import write_text
from ..errors import SolError

# Char-level answers are long ("16 multiplied by 10 is 160." after the tool call): 48 tokens cut some off.
MAX_NEW = 96
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# Sized for a 2-core laptop CPU: all four stages in well under 30 minutes.
STARTER = {
    "model": ["--layers", "4", "--heads", "4", "--d-model", "128", "--context", "128"],
    "pretrain": ["--max-steps", "1200", "--batch-size", "16", "--lr", "2e-3", "--warmup", "50",
                 "--eval-every", "200", "--sample-every", "400", "--checkpoint-every", "400"],
    "sft": ["--max-steps", "900", "--batch-size", "24", "--lr", "2e-3", "--warmup", "30",
            "--eval-every", "150", "--sample-every", "150", "--checkpoint-every", "300"],
    "reward": ["--max-steps", "150", "--batch-size", "16", "--lr", "3e-4", "--warmup", "10",
               "--eval-every", "50", "--checkpoint-every", "150"],
    # Many prompts per step and a small learning rate: the SFT model is right ~95 % of the time, so
    # most groups of 8 answers agree and teach nothing; the few that disagree must add up.
    "rl": ["--max-steps", "200", "--batch-size", "16", "--samples", "8", "--lr", "1e-4", "--warmup", "5",
           "--beta", "0.02", "--reward", "calculator", "--eval-every", "50", "--sample-every", "50",
           "--checkpoint-every", "50", "--max-new-tokens", str(MAX_NEW)],
    "data": {"sft": 4000, "prefs": 2000, "rl": 2000, "eval": 200, "chat_corpus": 2000},
}

# Words: shakespeare_complete.txt (5 MB, about 1.4 M tokens at 4096 BPE tokens). Four layers of 192 with
# tied embeddings are 2.6 M parameters (10.5 MB in float32, under the 12 MB a shipped model may take);
# 4096 tokens keep common words whole. Steps sized for about 20 minutes on a 2-core laptop CPU.
WORDS = {
    "tokenizer": "bpe:4096",
    "model": ["--layers", "4", "--heads", "4", "--d-model", "192", "--context", "128"],
    "pretrain": ["--max-steps", "2000", "--batch-size", "16", "--lr", "2e-3", "--warmup", "60",
                 "--eval-every", "250", "--sample-every", "500", "--checkpoint-every", "250"],
}
# What the words recipe records in sol.json about its embeddings (the book's §2.6 examples, in English).
PROBE_WORDS = ["king", "queen", "love", "sword"]
PROBE_ANALOGY = ("king", "man", "woman")


def add_arguments(p) -> None:
    p.add_argument("recipe", choices=["starter", "words"], help="which recipe")
    p.add_argument("--corpus", required=True,
                   help="pretraining text (tinyshakespeare.txt for starter, shakespeare_complete.txt for words)")
    p.add_argument("--out", required=True, help="where the final model goes")
    p.add_argument("--work", default=None, help="folder for data and the stages' runs (default: <SOL_HOME>/runs/starter)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recipe in --work")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (tests use 0.02)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: 1 when the machine is already busy, else torch's choice)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--events", default=None, metavar="PATH|-")


def _stage_args(name: str, argv: list[str]):
    from .stages import builtin_stages
    spec = next(s for s in builtin_stages() if s.name == name)
    parser = argparse.ArgumentParser(prog=f"sol train {name}")
    spec.add_arguments(parser)
    return spec, parser.parse_args(argv)


def _scaled(argv: list[str], scale: float) -> list[str]:
    out = list(argv)
    for flag in ("--max-steps", "--eval-every", "--sample-every", "--checkpoint-every", "--warmup"):
        if flag in out:
            i = out.index(flag) + 1
            out[i] = str(max(1, round(int(out[i]) * scale)))
    return out


def _render_chats(records: list[dict]) -> str:
    from ..formats.tokenizer import EOT, SOL_CHAT_TEMPLATE, render_template
    return EOT.join(render_template(SOL_CHAT_TEMPLATE, messages=r["messages"], add_generation_prompt=False)
                    for r in records)


def make_data(work: Path, seed: int, sizes: dict) -> dict:
    from ..data import synthetic
    paths = {k: work / f"{k}.jsonl" for k in ("sft", "prefs", "rl", "rl_val", "eval")}
    synthetic.write("sft", sizes["sft"], seed, paths["sft"])
    synthetic.write("prefs", sizes["prefs"], seed + 1, paths["prefs"])
    train_rl = synthetic.generate("rl", sizes["rl"], seed + 2)
    seen = {r["prompt"] for r in train_rl} | {r["messages"][0]["content"]
                                             for r in synthetic.generate("sft", sizes["sft"], seed)}
    # Two sets never seen in SFT or RL training and sharing no prompt: RL's validation set picks its
    # best checkpoint; the held-out set is only read once, at the end, to compare SFT with RL.
    held = _unseen(sizes["eval"], seed + 3, seen)
    val = _unseen(sizes["eval"], seed + 5, seen | {r["prompt"] for r in held})
    write_text(paths["rl"], "".join(json.dumps(r) + "\n" for r in train_rl))
    write_text(paths["rl_val"], "".join(json.dumps(r) + "\n" for r in val))
    write_text(paths["eval"], "".join(json.dumps(r) + "\n" for r in held))
    paths["chat_corpus"] = work / "chats.txt"
    write_text(paths["chat_corpus"], _render_chats(synthetic.generate("sft", sizes["chat_corpus"], seed + 4)))
    return paths


def _unseen(n: int, seed: int, seen: set) -> list[dict]:
    from ..data import synthetic
    out, s = [], seed
    while len(out) < n:
        out += [r for r in synthetic.generate("rl", n, s) if r["prompt"] not in seen and
                r["prompt"] not in {o["prompt"] for o in out}]
        s += 1000
    return out[:n]


def _threads(asked: int) -> int:
    """On a CPU others are using, two threads wait on each other at every barrier; one is faster."""
    import os
    if asked:
        return asked
    try:
        return 1 if os.getloadavg()[0] > 1.5 else 0
    except OSError:
        return 0


def _folders(args) -> tuple[Path, Path, Path]:
    """(corpus, work, out), checked before anything is written."""
    from ..formats.registry import data_dir
    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise SolError(f"--corpus {corpus}: no such file")
    work = Path(args.work) if args.work else data_dir() / "runs" / args.recipe
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "sol.json").is_file())):
        raise SolError(f"--out {out}: is not empty and is not a Sol model; nothing was changed: choose a new "
                       "or empty folder for --out")
    from .loop import check_writable
    check_writable(out)
    if work.exists() and any(work.iterdir()) and not args.resume:
        raise SolError(f"--work {work}: already holds a recipe run; add --resume to continue it, or choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    return corpus, work, out


def run(args, emit) -> dict:
    if args.recipe == "words":
        return run_words(args, emit)
    from .rl import Scorer, accuracy
    corpus, work, out = _folders(args)
    t0 = time.time()
    cfg = STARTER
    sizes = cfg["data"]
    paths = make_data(work, args.seed, sizes)   # deterministic: rewriting on resume gives the same files
    common = ["--device", args.device, "--seed", str(args.seed), "--threads", str(_threads(args.threads))]
    plan = [
        ("pretrain", work / "base", ["--corpus", str(corpus), "--corpus", str(paths["chat_corpus"]),
                                     "--tokenizer", "char", *cfg["model"], *cfg["pretrain"]]),
        ("sft", work / "sft", ["--model", str(work / "base"), "--data", str(paths["sft"]), *cfg["sft"]]),
        ("reward", work / "rm", ["--model", str(work / "sft"), "--data", str(paths["prefs"]), *cfg["reward"]]),
        ("rl", work / "rl", ["--model", str(work / "sft"), "--prompts", str(paths["rl"]),
                             "--eval-prompts", str(paths["rl_val"]), *cfg["rl"]]),
    ]
    results = {}
    for name, stage_out, argv in plan:
        if args.resume and (stage_out / "sol.json").is_file():
            results[name] = json.loads((stage_out / "sol.json").read_text()).get("metrics", {})
            continue   # this stage finished before the recipe was interrupted
        spec, sargs = _stage_args(name, [*_scaled(argv, args.scale), "--out", str(stage_out), *common])
        sargs.resume = args.resume and (stage_out / "checkpoints").is_dir()
        done = spec.run(sargs, lambda e, n=name: emit({**e, "recipe_stage": n, **({"final": False}
                                                          if e["type"] == "done" else {})}))
        if done.get("stopped"):
            return done
        results[name] = done["metrics"]
    # The same 200 held-out prompts, greedy, calculator running: SFT before RL, and RL after (its last
    # step; rl/best, the step best on RL's validation prompts, is there to compare by hand).
    from ..data import jsonl
    from ..formats.checkpoint import load_model
    held = jsonl.read_prompts(paths["eval"], need_answer=True)
    sft = load_model(work / "sft")
    scorer = Scorer("calculator", None, "cpu", sft.tokenizer)
    sft_acc = accuracy(sft.model, sft.tokenizer, held, scorer, MAX_NEW)
    rl_dir = work / "rl"
    rl = load_model(rl_dir)
    rl_acc = accuracy(rl.model, rl.tokenizer, held, scorer, MAX_NEW)
    emit({"type": "eval", "step": 0, "recipe_stage": "compare", "sft_accuracy": sft_acc["accuracy"],
          "rl_accuracy": rl_acc["accuracy"], "accuracy": rl_acc["accuracy"], "reward_mean": rl_acc["reward_mean"]})
    from .common import chat_sample
    answer = chat_sample(rl.model, rl.tokenizer)
    meta = json.loads((work / "rl" / "sol.json").read_text())
    meta.update({"name": out.name, "recipe": "starter", "recipe_seconds": round(time.time() - t0, 1),
                 "held_out": {"prompts": len(held), "sft_accuracy": sft_acc["accuracy"],
                              "rl_accuracy": rl_acc["accuracy"], "sft_tool_use": sft_acc["tool_use"],
                              "rl_tool_use": rl_acc["tool_use"]},
                 "stages": {n: {"out": str(o), "metrics": results.get(n, {})} for n, o, _ in plan},
                 "example": answer})
    install(rl_dir, out, meta)
    done = {"type": "done", "out": str(out), "final": True, "metrics": meta["held_out"],
            "elapsed_s": time.time() - t0, "example": answer}
    emit(done)
    return done


def run_words(args, emit) -> dict:
    """Pretrain only: a base model is all an embedding explorer needs, and all 20 minutes allow."""
    corpus, work, out = _folders(args)
    t0 = time.time()
    base = work / "base"
    common = ["--device", args.device, "--seed", str(args.seed), "--threads", str(_threads(args.threads))]
    argv = ["--corpus", str(corpus), "--tokenizer", WORDS["tokenizer"], *WORDS["model"], *WORDS["pretrain"]]
    if not (args.resume and (base / "sol.json").is_file()):
        spec, sargs = _stage_args("pretrain", [*_scaled(argv, args.scale), "--out", str(base), *common])
        sargs.resume = args.resume and (base / "checkpoints").is_dir()
        done = spec.run(sargs, lambda e: emit({**e, "recipe_stage": "pretrain",
                                               **({"final": False} if e["type"] == "done" else {})}))
        if done.get("stopped"):
            return done
    from ..formats.checkpoint import load_model
    meta = json.loads((base / "sol.json").read_text())
    meta.update({"name": out.name, "recipe": "words", "recipe_seconds": round(time.time() - t0, 1),
                 "embeddings": probe(load_model(base))})
    install(base, out, meta)
    done = {"type": "done", "out": str(out), "final": True, "metrics": meta.get("metrics", {}),
            "elapsed_s": time.time() - t0, "embeddings": meta["embeddings"]}
    emit(done)
    return done


def probe(loaded) -> dict:
    """Neighbours of a few words and king - man + woman, each word after a space (a whole BPE token)."""
    from ..introspect.embeddings import analogy, neighbours
    near = {w: [n["text"] for n in neighbours(loaded, " " + w, 8)["neighbours"]] for w in PROBE_WORDS}
    a, b, c = (" " + w for w in PROBE_ANALOGY)
    return {"neighbours": near, "analogy": {"query": " - ".join(PROBE_ANALOGY[:2]) + " + " + PROBE_ANALOGY[2],
                                            "nearest": [n["text"] for n in analogy(loaded, a, b, c, 8)["neighbours"]]}}


def install(src: Path, out: Path, meta: dict) -> None:
    """Copy the model files into out, each atomically; sol.json last so a complete directory has one."""
    from ..atomic import replace, temp_path_for
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        tmp = temp_path_for(out / name)
        shutil.copyfile(src / name, tmp)
        replace(tmp, out / name)
    write_text(out / "sol.json", json.dumps(meta, indent=2) + "\n")
