"""Score, embeddings and the logit lens (the book's §2.6, §2.9, Box 7): against transformers, against
planted embedding rows, and against the model's own prediction."""
import io
import json
import math
from contextlib import redirect_stdout

import pytest
import torch
from conftest import make_tiny_model

from sol.core.cli import main
from sol.core.formats.checkpoint import load_model, save_model


def cli_json(*argv) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(list(argv)) == 0
    return json.loads(buf.getvalue())


TEXT = "It is the east, and Juliet is the sun."


@pytest.mark.parametrize("family", ["gpt2", "llama-untied"])
def test_score_equals_transformers_log_softmax(family, tmp_path):
    from hf_models import make_hf_model
    folder = tmp_path / family
    ref = make_hf_model(family, folder)
    out = cli_json("score", "--model", str(folder), "--text", TEXT, "--json")
    # These random models have no BOS or end-of-text token: the first token is not scored, and says so.
    assert out["conditioned_on"] is None and out["tokens"][0]["logprob"] is None
    ids = [t["id"] for t in out["tokens"]]
    with torch.no_grad():
        expected = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
    assert expected.std() > 0.1
    for t in range(1, len(ids)):
        row = expected[t - 1]
        tok = out["tokens"][t]
        assert abs(tok["logprob"] - row[ids[t]].item()) <= 1e-4
        assert tok["rank"] == int((row > row[ids[t]]).sum()) + 1
        assert [a["id"] for a in tok["top"]] == row.topk(5).indices.tolist()
    total = sum(t["logprob"] for t in out["tokens"][1:])
    assert abs(out["total_logprob"] - total) <= 1e-6
    assert out["perplexity"] == pytest.approx(math.exp(-total / (len(ids) - 1)), rel=1e-9)
    assert set(out["tokens"][1]) >= {"id", "text", "logprob", "rank", "top"}


def test_score_conditions_on_end_of_text(tiny_model):
    """Sol's models have <|endoftext|> between documents: the first token is scored after it."""
    loaded = load_model(tiny_model)
    out = cli_json("score", "--model", str(tiny_model), "--text", "Speak, speak.", "--json")
    eot = loaded.tokenizer.eos_id
    assert out["conditioned_on"] == "<|endoftext|>" and out["conditioned_on_ids"] == [eot]
    ids = loaded.tokenizer.encode_ids("Speak, speak.", add_special_tokens=False)
    assert [t["id"] for t in out["tokens"]] == ids
    with torch.no_grad():
        lp = torch.log_softmax(loaded.model(torch.tensor([[eot] + ids]))[0], -1)
    assert out["tokens"][0]["logprob"] == pytest.approx(lp[0, ids[0]].item(), abs=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(-out["total_logprob"] / len(ids)))


def single_tokens(tok, n: int) -> list[tuple[int, str]]:
    """n (id, text) pairs whose text encodes back to exactly that one id."""
    found = []
    for i in range(tok.vocab_size - 1, 0, -1):
        s = tok.decode([i])
        if s.strip() and tok.encode_ids(s, add_special_tokens=False) == [i] and tok.special_tokens().get(s) is None:
            found.append((i, s))
        if len(found) == n:
            return found
    raise AssertionError("not enough single-token words")


@pytest.fixture
def planted(tmp_path):
    """A model whose embedding rows are planted: d's row is exactly a - b + c, and n's row is q's plus a
    little noise, so the nearest neighbour of q and the analogy's answer are known."""
    folder = make_tiny_model(tmp_path / "planted", tie_embeddings=False)
    loaded = load_model(folder)
    (a, ta), (b, tb), (c, tc), (d, td), (q, tq), (n, tn) = single_tokens(loaded.tokenizer, 6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        E = loaded.model.embed.weight
        E.copy_(torch.randn(E.shape, generator=g))
        E[d] = E[a] - E[b] + E[c]
        E[n] = E[q] + 0.05 * torch.randn(E.shape[1], generator=g)
    save_model(folder, loaded.model, loaded.tokenizer, loaded.meta)
    return folder, dict(a=(a, ta), b=(b, tb), c=(c, tc), d=(d, td), q=(q, tq), n=(n, tn))


def direct_cosine(E: torch.Tensor, v: torch.Tensor) -> list[float]:
    return [float(v @ E[i] / (v.norm() * E[i].norm())) for i in range(E.shape[0])]


def test_neighbours_and_analogy_find_the_planted_rows(planted):
    folder, w = planted
    E = load_model(folder).model.embed.weight.detach().float()
    out = cli_json("embed", "neighbours", "--model", str(folder), "--text", w["q"][1], "--k", "5", "--json")
    assert out["query"] == w["q"][1] and out["ids"] == [w["q"][0]]
    assert out["neighbours"][0]["id"] == w["n"][0]
    cos = direct_cosine(E, E[w["q"][0]])
    cos[w["q"][0]] = -2
    order = sorted(range(len(cos)), key=lambda i: -cos[i])[:5]
    assert [x["id"] for x in out["neighbours"]] == order
    for x in out["neighbours"]:
        assert x["cosine"] == pytest.approx(cos[x["id"]], abs=1e-5)

    out = cli_json("embed", "analogy", "--model", str(folder), "--a", w["a"][1], "--b", w["b"][1],
                   "--c", w["c"][1], "--k", "3", "--json")
    assert out["neighbours"][0]["id"] == w["d"][0]
    assert out["neighbours"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert not {w[k][0] for k in "abc"} & {x["id"] for x in out["neighbours"]}


def test_map_pca_explained_variance(planted):
    from sol.core.introspect.embeddings import word_map
    folder, w = planted
    loaded = load_model(folder)
    words = [w[k][1] for k in "abcdqn"]
    m = word_map(loaded, words)
    X = loaded.model.embed.weight.detach().float()[[w[k][0] for k in "abcdqn"]]
    X = X - X.mean(0)
    s = torch.linalg.svdvals(X) ** 2
    assert m["explained_variance"] == pytest.approx((s[:2] / s.sum()).tolist(), abs=1e-5)
    # The map keeps the distances the first two components carry: q and n stay the closest pair.
    xy = torch.tensor(m["xy"])
    assert torch.dist(xy[4], xy[5]) < min(torch.dist(xy[4], xy[i]) for i in range(4))


@pytest.mark.parametrize("cfg", [{}, {"positions": "rope", "norm": "rmsnorm"}], ids=["learned", "rope"])
def test_context_cosine_is_one_at_the_embedding_and_less_after(tmp_path, cfg):
    folder = make_tiny_model(tmp_path / "m", **cfg)
    out = cli_json("embed", "context", "--model", str(folder), "--word", "speak",
                   "--sentence", "Speak, speak.", "--sentence", "All: hear me speak", "--json")
    assert out["layers"] == [0, 1, 2]
    assert out["cosine"][0] == pytest.approx(1.0, abs=1e-6)
    assert all(c < 0.9999 for c in out["cosine"][1:])


def test_positions_learned_and_rope(tmp_path):
    from sol.core.introspect.embeddings import positions
    learned = positions(load_model(make_tiny_model(tmp_path / "a")), n=16)
    assert learned["kind"] == "learned" and len(learned["cosine"]) == 16
    assert all(abs(learned["cosine"][i][i] - 1) < 1e-5 for i in range(16))
    rope = positions(load_model(make_tiny_model(tmp_path / "b", positions="rope")))
    assert rope["kind"] == "rope" and len(rope["frequencies"]) == 8   # head_dim 16: 8 pairs
    assert rope["frequencies"][0] == 1.0 and rope["frequencies"] == sorted(rope["frequencies"], reverse=True)


@pytest.mark.parametrize("family", ["gpt2", "gemma3-softcap"])
def test_lens_last_layer_is_the_models_prediction(family, tmp_path):
    from hf_models import make_hf_model
    folder = tmp_path / family
    ref = make_hf_model(family, folder)
    out = cli_json("lens", "--model", str(folder), "--text", TEXT, "--top", "2", "--json")
    ids = [p["id"] for p in out["positions"]]
    with torch.no_grad():
        probs = torch.softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
    assert out["layers"] == list(range(len(out["positions"][0]["per_layer"])))
    for t, pos in enumerate(out["positions"]):
        last = pos["per_layer"][-1]
        assert last["id"] == int(probs[t].argmax())
        assert last["prob"] == pytest.approx(float(probs[t].max()), abs=1e-4)
        assert len(last["top"]) == 2
    # Earlier layers read differently (else the lens would show nothing).
    assert any(p["per_layer"][0]["id"] != p["per_layer"][-1]["id"] for p in out["positions"])


def test_errors_name_the_argument(tiny_model, capsys):
    assert main(["embed", "context", "--model", str(tiny_model), "--word", "zebra",
                 "--sentence", "a", "--sentence", "b"]) == 1
    assert "--word" in capsys.readouterr().err
    assert main(["score", "--model", str(tiny_model), "--text", ""]) == 1
    assert "--text" in capsys.readouterr().err


def test_embed_map_and_positions_cli(planted):
    folder, w = planted
    words = ",".join(w[k][1].strip() or w[k][1] for k in "abcq")
    out = cli_json("embed", "map", "--model", str(folder), "--words", words, "--json")
    assert out["method"] == "pca" and len(out["xy"]) == 4 and 0 < sum(out["explained_variance"]) <= 1 + 1e-6
    assert main(["embed", "map", "--model", str(folder), "--words", words, "--method", "tsne"]) == 1
    pos = cli_json("embed", "positions", "--model", str(folder), "--n", "8", "--json")
    assert pos["kind"] == "learned" and len(pos["cosine"]) == 8
