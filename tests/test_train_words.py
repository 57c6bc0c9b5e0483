"""`sol train recipe words` and the shipped `words` model (byte-level BPE, for the embedding explorer)."""
from __future__ import annotations

import json

from conftest import TINY_TEXT

from sol.core.cli import main
from sol.core.formats.registry import builtin_models_dir

WORDS = builtin_models_dir() / "words"


def test_words_recipe_pretrains_a_bpe_model_and_records_its_neighbours(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT * 10, encoding="utf-8")
    out = tmp_path / "words"
    assert main(["train", "recipe", "words", "--corpus", str(corpus), "--out", str(out), "--work",
                 str(tmp_path / "work"), "--scale", "0.002", "--threads", "1",
                 "--events", str(tmp_path / "events.jsonl")]) == 0
    meta = json.loads((out / "sol.json").read_text())
    assert meta["recipe"] == "words" and meta["stage"] == "base" and meta["tokenizer"] == "bpe:4096"
    assert set(meta["embeddings"]["neighbours"]) == {"king", "queen", "love", "sword"}
    assert len(meta["embeddings"]["analogy"]["nearest"]) == 8
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_layer"], cfg["d_model"], cfg["context"]) == (4, 192, 128)
    # A second run into the same work folder without --resume changes nothing.
    assert main(["train", "recipe", "words", "--corpus", str(corpus), "--out", str(out), "--work",
                 str(tmp_path / "work")]) == 1


def test_shipped_words_model_is_small_and_whole_words_are_tokens():
    from sol.core.formats.checkpoint import load_model
    from sol.core.introspect.embeddings import neighbours
    size = sum(f.stat().st_size for f in WORDS.iterdir() if f.is_file())
    assert size <= 12 * 2**20
    meta = json.loads((WORDS / "sol.json").read_text())
    assert meta["recipe"] == "words" and meta["metrics"]["val_loss"] < 5.0
    loaded = load_model(WORDS)
    for w in (" king", " queen", " love", " sword"):
        assert len(loaded.tokenizer.encode_ids(w, add_special_tokens=False)) == 1
    assert len(neighbours(loaded, " king", 5)["neighbours"]) == 5
