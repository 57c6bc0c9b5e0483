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
    # Llama with attention_bias: biases on q, k, v and the output projection o_proj.
    "llama-attn-bias": lambda t: t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, attention_bias=True),
    # Sliding windows of 8 positions, so the 24- and 40-token tests run well past them.
    "qwen2-sliding": lambda t: t.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                             num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                             max_position_embeddings=128, use_sliding_window=True,
                                             sliding_window=8, max_window_layers=1),
    "mistral-sliding": lambda t: t.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                                 max_position_embeddings=128, sliding_window=8),
    # Llama 3.1's "llama3" RoPE scaling with an original context of 32 (top-level too, where llama.cpp's
    # converter reads it), so over 24 positions all three bands count: kept, smoothed, divided by the factor.
    "llama3-rope": lambda t: t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=128, original_max_position_embeddings=32,
                                           rope_scaling={"rope_type": "llama3", "factor": 4.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32}),
    "qwen2-yarn": lambda t: t.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                          max_position_embeddings=128,
                                          rope_scaling={"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 32}),
    # Qwen3: per-head q/k RMSNorm, head_dim (24) unrelated to hidden_size / heads (16).
    "qwen3": lambda t: t.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                     max_position_embeddings=128, tie_word_embeddings=True),
    # Gemma 3 text, as the 1B: sliding/global layers (pattern 2 here), local RoPE base, query_pre_attn_scalar.
    "gemma3": lambda t: t.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=32, max_position_embeddings=128, sliding_window=8,
                                           sliding_window_pattern=2, query_pre_attn_scalar=24,
                                           rope_theta=50000.0, rope_local_base_freq=1000.0,
                                           tie_word_embeddings=False),
    # ... and with Gemma 2-style soft-capping and linear RoPE scaling on the global layers (Gemma 3 4B).
    "gemma3-softcap": lambda t: t.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                                   head_dim=16, max_position_embeddings=128, sliding_window=8,
                                                   sliding_window_pattern=2, attn_logit_softcapping=3.0,
                                                   final_logit_softcapping=4.0,
                                                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # Gemma 2: Gemma 3 without q/k norms or a local RoPE base, with soft-capped attention scores and logits.
    "gemma2": lambda t: t.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=24,
                                       attn_logit_softcapping=3.0, final_logit_softcapping=6.0,
                                       tie_word_embeddings=False),
    # Gemma 2 and 3 as llama.cpp runs them (tests/test_gguf_families.py): tied embeddings (llama.cpp's gemma2
    # has no output.weight) and query_pre_attn_scalar = head_dim (llama.cpp derives the scale, no key holds it);
    # Gemma 3 with its five sliding layers to one global (llama.cpp's default pattern), final soft-capping and
    # linear RoPE scaling on the global layers (as the 4B).
    "gemma2-tied": lambda t: t.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, max_position_embeddings=128, sliding_window=8,
                                            query_pre_attn_scalar=16, attn_logit_softcapping=3.0,
                                            final_logit_softcapping=6.0, tie_word_embeddings=True),
    "gemma3-tied": lambda t: t.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                                                head_dim=32, max_position_embeddings=128, sliding_window=8,
                                                sliding_window_pattern=6, query_pre_attn_scalar=32,
                                                rope_theta=50000.0, rope_local_base_freq=1000.0,
                                                final_logit_softcapping=4.0, tie_word_embeddings=True,
                                                rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # Phi-3 mini: fused qkv_proj and gate_up_proj, a sliding window (2047 in the 4k model).
    "phi3": lambda t: t.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   sliding_window=12),
    # Phi-4-mini: partial RoPE (3/4 of each head) with longrope past the original 16 positions, tied embeddings.
    "phi3-longrope": lambda t: t.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, original_max_position_embeddings=16,
                                            partial_rotary_factor=0.75, tie_word_embeddings=True,
                                            rope_scaling={"type": "longrope",
                                                          "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                                          "long_factor": [2.0 + 0.7 * i for i in range(6)]}),
}

# Seeds other than 3 where seed 3's random model repeats one token.
SEEDS = {"phi3-longrope": 8, "gemma3-softcap": 7, "gemma2-tied": 2}
# Gemma multiplies embeddings by sqrt(hidden_size): with tied embeddings at the wide init below, each token's
# own embedding dominates its logits and greedy repeats the prompt's last token forever. Narrower there.
EMBED_STD = {"gemma3-softcap": 0.05, "gemma2-tied": 0.05, "gemma3-tied": 0.05}

CORPUS = ("It is the east, and Juliet is the sun. Olá, café! 世界 🌍 naïve coöperation.\n" * 40)


def byte_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with no special tokens, so nothing ends generation early."""
    from sol.core.formats.tokenizer import train_bpe
    corpus = folder.parent / f"{folder.name}-corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    tok = train_bpe([corpus], VOCAB - 20, special_tokens=[])
    return fill_vocab(tok)


def fill_vocab(tok, size: int = VOCAB):
    """`tok` with `<unusedN>` tokens appended up to `size` ids, as Gemma's and Llama 3's vocabularies have:
    every row of the model then belongs to a token, so Sol masks none of them (a model wider than its
    tokenizer gets -inf past its last id; tests/test_vocab_padding.py) and transformers' logits compare
    column for column."""
    from tokenizers import AddedToken
    have = tok.id_limit
    tok.hf.add_tokens([AddedToken(f"<unused{i}>", special=False, normalized=False) for i in range(size - have)])
    assert tok.id_limit == size, tok.id_limit
    return tok


def make_hf_model(family: str, folder: Path, seed: int | None = None):
    """Write a random model of `family` to `folder`; returns the transformers model (eval mode).
    Seed 3 (or SEEDS') gives every family a varied greedy continuation (some seeds make random Qwen2 repeat
    one token)."""
    import transformers
    cfg = FAMILIES[family](transformers)
    # No eos/bos: greedy generation then runs its full length in both implementations.
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = None
    torch.manual_seed(SEEDS.get(family, 3) if seed is None else seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        # Wider weights than the default init give well-separated logits, so greedy never hinges on a near-tie.
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        if family in EMBED_STD:
            model.get_input_embeddings().weight.normal_(0.0, EMBED_STD[family])
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer(folder).save(folder / "tokenizer.json")
    return model
