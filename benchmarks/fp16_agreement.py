"""Does half precision pick the same next token as float32 on a trained model?

Uses resources/models/starter/ when it exists (or --model DIR); otherwise trains
a small character-level model for a few hundred steps on the first 90% of
tinyshakespeare. Then, on the held-out last 10%, it compares the top-1 next
token of the float16 model (weights in float16 on the CPU, decoding one token
at a time from the KV cache, as generation does) with float32's.

    python benchmarks/fp16_agreement.py [--model DIR] [--steps 300] [--positions 1024] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
STARTER = ROOT / "resources" / "models" / "starter"


def train_char_model(out: Path, text: str, steps: int, log) -> None:
    """nanoGPT's shakespeare_char, smaller: enough for confident, text-like predictions."""
    from sol.core.formats.checkpoint import save_model
    from sol.core.formats.tokenizer import train_char
    from sol.core.model.config import ModelConfig
    from sol.core.model.transformer import Transformer
    corpus = out.parent / "train.txt"
    corpus.write_text(text, encoding="utf-8")
    tok = train_char([corpus])
    data = torch.tensor(tok.encode_ids(text, add_special_tokens=False))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=128, context=256)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    seq, batch = 128, 16
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    save_model(out, model, tok, {"name": "fp16-agreement", "stage": "base"})


@torch.inference_mode()
def decode_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits after each position, fed one token at a time through the KV cache."""
    cache = model.new_cache(1, len(ids))
    out = [model(torch.tensor([[i]]), cache=cache)[0, -1].float() for i in ids]
    return torch.stack(out)


def agreement(d: Path, held_out: str, positions: int, log) -> dict:
    from sol.core.formats.checkpoint import load_model
    lm32 = load_model(d, dtype=torch.float32)
    lm16 = load_model(d, dtype=torch.float16)
    ids = lm32.tokenizer.encode_ids(held_out, add_special_tokens=False)
    window = min(lm32.config.context, 256)
    n = min(positions, len(ids)) // window * window
    top32, top16, loss32 = [], [], []
    for s in range(0, n, window):   # windows of the context size, each a fresh cache
        chunk = ids[s:s + window]
        with torch.inference_mode():
            l32 = lm32.model(torch.tensor([chunk]))[0].float()
        l16 = decode_logits(lm16.model, chunk)
        top32.append(l32.argmax(-1))
        top16.append(l16.argmax(-1))
        loss32.append(F.cross_entropy(l32[:-1], torch.tensor(chunk[1:]), reduction="sum"))
    a, b = torch.cat(top32), torch.cat(top16)
    res = {"positions": int(a.numel()), "top1_agreement": round(float((a == b).float().mean()), 4),
           "held_out_loss_fp32": round(float(sum(loss32)) / (a.numel() - len(loss32)), 3)}
    log(f"fp16 top-1 equals fp32 on {int((a == b).sum())}/{a.numel()} held-out positions "
        f"({100 * res['top1_agreement']:.2f}%); fp32 held-out loss {res['held_out_loss_fp32']}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a trained model directory (default: the starter model, or train one)")
    p.add_argument("--steps", type=int, default=300, help="training steps when no model is given")
    p.add_argument("--positions", type=int, default=1024, help="held-out positions to compare")
    p.add_argument("--json", action="store_true", help="last line: the result as one JSON object")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    text = DATA.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train, held_out = text[:cut], text[cut:]
    model_dir = args.model or (STARTER if (STARTER / "config.json").is_file() else None)
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            log(f"training a character-level model for {args.steps} steps on the first 90% of {DATA.name}")
            train_char_model(model_dir, train, args.steps, log)
        else:
            log(f"model: {model_dir} (its training text may overlap the held-out 10% if it was not split this way)")
        res = agreement(model_dir, held_out, args.positions, log)
    res["model"] = str(args.model or (STARTER if model_dir == STARTER else "trained here"))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
