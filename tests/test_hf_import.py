"""Importing Hugging Face checkpoints: every tensor used or refused by name, configs read in the spelling
real model repositories use, the new families found in the HF cache, unsupported things named."""
import json

import pytest
import torch
from hf_models import VOCAB, make_hf_model

from sol.core.errors import SolError
from sol.core.formats.checkpoint import config_from_hf, load_model


def rewrite_weights(folder, change):
    from safetensors.torch import load_file, save_file
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    change(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_a_tensor_sol_has_no_place_for_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "llama"
    make_hf_model("llama-untied", folder)
    # An o_proj bias, as attention_bias=true checkpoints have, under a config that says there is none.
    rewrite_weights(folder, lambda sd: sd.update({"model.layers.1.self_attn.o_proj.bias": torch.ones(64)}))
    with pytest.raises(SolError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.o_proj\.bias'"):
        load_model(folder)


def test_recomputed_rope_buffers_of_old_checkpoints_are_skipped(tmp_path):
    folder = tmp_path / "llama"
    ref = make_hf_model("llama-untied", folder)
    rewrite_weights(folder, lambda sd: sd.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8)
                                                  for i in range(2)}))
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (load_model(folder).model(x) - ref(x).logits).abs().max() <= 1e-4


def test_a_tied_model_with_a_different_head_on_disk_is_refused(tmp_path):
    folder = tmp_path / "qwen3"
    make_hf_model("qwen3", folder)    # tied
    rewrite_weights(folder, lambda sd: sd.update({"lm_head.weight": torch.randn(VOCAB, 64)}))
    with pytest.raises(SolError, match="'lm_head.weight'"):
        load_model(folder)
    # The same tensor as the embedding (what some savers write) is fine.
    rewrite_weights(folder, lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    load_model(folder)


# config.json as the models' own repositories spell it (rope_scaling, rope_theta, no layer_types), which
# transformers 5 still reads; Sol must read it the same way.
HUB_SPELLING = {
    "qwen2-sliding": lambda c: c.update(rope_theta=10000.0),
    "qwen2-yarn": lambda c: c.update(rope_theta=10000.0, rope_scaling={
        "factor": 4.0, "original_max_position_embeddings": 32, "type": "yarn"}),
    "gemma3": lambda c: c.update(rope_theta=50000.0, rope_local_base_freq=1000.0, rope_scaling=None,
                                 sliding_window_pattern=2),
    "phi3-longrope": lambda c: c.update(rope_theta=10000.0, rope_scaling={
        "type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
        "long_factor": [2.0 + 0.7 * i for i in range(6)]}),
}


@pytest.mark.parametrize("family", sorted(HUB_SPELLING))
def test_configs_in_the_hub_spelling_load_as_transformers_reads_them(family, tmp_path):
    import transformers
    folder = tmp_path / family
    make_hf_model(family, folder)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        cfg.pop(key, None)
    HUB_SPELLING[family](cfg)
    path.write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (load_model(folder).model(x) - ref(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cfg,named", [
    ({"model_type": "gemma3"}, "'gemma3'"),   # the multimodal one: not a text model
    ({"model_type": "qwen2", "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "short_factor": [1], "long_factor": [1]}},
     "'longrope'"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "short_factor"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_unsupported_architectures_and_rope_types_are_named(cfg, named, tmp_path):
    base = {"vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 160}
    with pytest.raises(SolError, match=named):
        config_from_hf({**base, **cfg}, tmp_path / "config.json")


def test_qwen2_windows_only_the_layers_from_max_window_layers_on(tmp_path):
    cfg = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "intermediate_size": 160, "use_sliding_window": True,
           "sliding_window": 16, "max_window_layers": 2}
    c = config_from_hf(cfg, tmp_path / "config.json")
    assert [c.window(i) for i in range(4)] == [None, None, 16, 16]
    assert [config_from_hf({**cfg, "use_sliding_window": False}, tmp_path).window(i) for i in range(4)] == [None] * 4


@pytest.mark.parametrize("family,arch", [("qwen3", "qwen3"), ("gemma3", "gemma3_text"), ("gemma2", "gemma2"),
                                         ("phi3", "phi3"), ("phi3-longrope", "phi3")])
def test_new_families_are_listed_from_the_hf_cache(family, arch, isolated_home, capsys):
    from sol.core.cli import main
    repo = f"someone/tiny-{family}"
    base = isolated_home / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "abc123"
    make_hf_model(family, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    found = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert found[repo]["architecture"] == arch and found[repo]["path"] == str(snap)
    assert found[repo]["parameters"] == sum(p.numel() for p in load_model(snap).model.parameters())


@pytest.mark.parametrize("family", ["gemma3", "phi3-longrope", "qwen2-sliding"])
def test_an_imported_model_saved_as_a_sol_model_computes_the_same(family, tmp_path):
    """A fine-tune of an imported model is saved in Sol's format: every switch travels in config.json."""
    from sol.core.formats.checkpoint import save_model
    folder = tmp_path / family
    make_hf_model(family, folder)
    lm = load_model(folder)
    again = load_model(save_model(tmp_path / "saved", lm.model, lm.tokenizer))
    assert again.format == "sol" and again.config == lm.config
    x = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(again.model(x), lm.model(x))
