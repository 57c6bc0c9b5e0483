"""GUI tests (pytest-qt, offscreen) for the Embeddings, Score and Layers panels: each view shows what the
headless core computes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_tiny_model  # noqa: E402


@pytest.fixture
def with_model(window, tmp_path):
    from sol.core.formats.checkpoint import load_model
    win, ctx = window
    ctx.set_model(load_model(make_tiny_model(tmp_path / "m")))
    return win, ctx


def test_the_three_panels_are_listed(window):
    win, _ = window
    assert {"embeddings", "score", "lens"} <= set(win.names())


def test_embeddings_panel_every_tab(with_model, qtbot):
    from sol.core.introspect import embeddings as E
    win, ctx = with_model
    panel = win.panel("embeddings")
    every = {"neighbours", "analogy", "map", "map_pick", "context", "positions"}
    qtbot.waitUntil(lambda: panel.is_ready() and every <= set(panel.results), timeout=30_000)
    assert panel.map_pick.text() == f"neighbours of {panel.results['map']['words'][0]!r}"
    # Neighbours: the table is the core's answer for the word after a space.
    panel.word.setText("speak")
    panel.run_neighbours()
    qtbot.waitUntil(panel.is_ready, timeout=10_000)
    want = E.neighbours(ctx.loaded, " speak", 10)["neighbours"]
    t = panel.neighbours_table
    assert t.rowCount() == 10 and t.item(0, 0).text() == repr(want[0]["text"])
    assert float(t.item(0, 1).text()) == pytest.approx(want[0]["cosine"], abs=1e-4)
    assert panel.analogy_table.rowCount() == 10
    # Map: one point and one label per word, explained variance shown; a click lists that word's neighbours.
    words = panel.results["map"]["words"]
    assert len(panel.points.points()) == len(words) == len(panel.labels)
    assert "% of the variance" in panel.map_info.text()
    pt = panel.points.points()[2]
    panel._map_clicked(panel.points, [pt])
    qtbot.waitUntil(panel.is_ready, timeout=10_000)
    assert panel.map_pick.text() == f"neighbours of {words[2]!r}"
    assert panel.map_table.item(0, 0).text() == repr(E.neighbours(ctx.loaded, words[2], 1)["neighbours"][0]["text"])
    # In context: a line from 1.0 at the embedding layer.
    x, y = panel.context_curve.getData()
    assert list(x) == [0, 1, 2] and y[0] == pytest.approx(1.0, abs=1e-6) and y[-1] < 1.0
    # Positions: the learned model's cosine matrix, 1 on the diagonal.
    img = panel.positions_image.image
    assert img.shape == (64, 64) and np.allclose(np.diag(img), 1.0, atol=1e-5)


def test_embeddings_positions_tab_shows_rope_frequencies(window, qtbot, tmp_path):
    from sol.core.formats.checkpoint import load_model
    win, ctx = window
    ctx.set_model(load_model(make_tiny_model(tmp_path / "r", positions="rope")))
    panel = win.panel("embeddings")
    qtbot.waitUntil(lambda: panel.is_ready() and "positions" in panel.results, timeout=20_000)
    x, y = panel.positions_curve.getData()
    assert len(x) == 8 and "RoPE" in panel.positions_info.text()


def test_score_panel_colors_tokens_and_compares_two_sentences(with_model, qtbot):
    from sol.core.introspect.score import score
    win, ctx = with_model
    panel = win.panel("score")
    panel.a.input.setText("Speak, speak.")
    panel.b.input.setText("Speak, zzkq.")
    panel.run()
    qtbot.waitUntil(panel.is_ready, timeout=20_000)
    a, b = score(ctx.loaded, "Speak, speak."), score(ctx.loaded, "Speak, zzkq.")
    assert panel.a.table.rowCount() == len(a["tokens"])
    assert panel.a.tokens.text().count("<span style=\"background") == len(a["tokens"])
    assert f"{a['total_logprob']:.3f}" in panel.a.totals.text()
    assert f"{a['perplexity']:.2f}" in panel.a.totals.text()
    d = a["total_logprob"] - b["total_logprob"]
    assert panel.verdict.text().startswith("A is more likely" if d >= 0 else "B is more likely")
    assert f"{abs(d):.3f}" in panel.verdict.text()
    # The probability column is colored: likelier tokens greener (a higher hue).
    from sol.plugins.sentence_score.panel import prob_color
    assert prob_color(0.9).hueF() > prob_color(0.001).hueF()
    assert float(panel.a.table.item(1, 1).text()) == pytest.approx(math.exp(a["tokens"][1]["logprob"]), abs=1e-4)


def test_lens_panel_grid_is_layers_by_positions_and_ends_in_the_prediction(with_model, qtbot):
    import torch
    win, ctx = with_model
    panel = win.panel("lens")
    panel.input.setPlainText("Before we proceed any further")
    panel.run()
    qtbot.waitUntil(lambda: panel.is_ready() and panel.result is not None, timeout=20_000)
    ids = ctx.tokenizer.encode_ids("Before we proceed any further")
    g = panel.grid
    assert g.rowCount() == 3 and g.columnCount() == len(ids)      # embedding + 2 layers
    with torch.no_grad():
        probs = torch.softmax(ctx.model(torch.tensor([ids]))[0], -1)
    for c in range(len(ids)):
        text, p = g.item(2, c).text().rsplit("\n", 1)
        assert float(p) == pytest.approx(float(probs[c].max()), abs=0.006)
        assert panel.result["positions"][c]["per_layer"][-1]["id"] == int(probs[c].argmax())
