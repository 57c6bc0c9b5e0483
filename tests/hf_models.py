"""Tiny random Hugging Face models written with save_pretrained, for equivalence tests.

transformers is a test reference only: nothing under core/ imports it."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320

FAMILIES = {
    "gpt2": lambda t: t.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4),
    "llama-gqa-tied": lambda t: t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                              max_position_embeddings=128, tie_word_embeddings=True),
    "llama-untied": lambda t: t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=128, tie_word_embeddings=False),
    "qwen2": lambda t: t.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128),
    "mistral": lambda t: t.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                         max_position_embeddings=128),
}

CORPUS = ("It is the east, and Juliet is the sun. Olá, café! 世界 🌍 naïve coöperation.\n" * 40)


def byte_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with no special tokens, so nothing ends generation early."""
    from sol.core.tokenizer import train_bpe
    corpus = folder.parent / f"{folder.name}-corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    tok = train_bpe([corpus], VOCAB - 20, special_tokens=[])
    return tok


def make_hf_model(family: str, folder: Path, seed: int = 3):
    """Write a random model of `family` to `folder`; returns the transformers model (eval mode).
    Seed 3 gives every family a varied greedy continuation (some seeds make random Qwen2 repeat one token)."""
    import transformers
    cfg = FAMILIES[family](transformers)
    # No eos/bos: greedy generation then runs its full length in both implementations.
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = None
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        # Wider weights than the default init give well-separated logits, so greedy never hinges on a near-tie.
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer(folder).save(folder / "tokenizer.json")
    return model
