"""Word embeddings, the book's §2.6 and Box 7: which tokens sit near each other, analogies, a 2-D map,
the same word in two contexts, and the position embeddings.

Static vectors are rows of the input embedding matrix. A word the tokenizer splits into several tokens
is the mean of their rows (a common, honest approximation; the ids used are always reported).
Similarity is cosine: the angle between vectors, not their length, which mostly tracks frequency.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SolError
from ..model.layers import rope_frequencies


def word_ids(tok, text: str, what: str = "--text") -> list[int]:
    ids = tok.encode_ids(text, add_special_tokens=False)
    if not ids:
        raise SolError(f"{what}: {text!r} has no tokens; give a word")
    return ids


def matrix(model) -> torch.Tensor:
    """The input embedding matrix (vocab, d_model) in float32 (an int8 table dequantized)."""
    e = model.embed
    if hasattr(e, "float_weight"):   # int8 rows times their scales (core/model/quant.py)
        return e.float_weight()
    return e.weight.detach().float()


def vector(model, ids: list[int]) -> torch.Tensor:
    return matrix(model)[ids].mean(0)


def nearest(model, tok, v: torch.Tensor, k: int, exclude: set[int] = frozenset()) -> list[dict]:
    """The k rows with the highest cosine to v, skipping `exclude`."""
    if k < 1:
        raise SolError(f"--k: {k}; give at least 1")
    cos = F.cosine_similarity(matrix(model), v[None, :], dim=-1)
    if exclude:
        cos[list(exclude)] = float("-inf")
    values, best = cos.topk(min(k, cos.shape[0] - len(exclude)))
    return [{"id": int(i), "text": tok.decode([int(i)]), "cosine": float(c)} for c, i in zip(values, best)]


@torch.no_grad()
def neighbours(loaded, text: str, k: int = 10) -> dict:
    """`sol embed neighbours`: the k tokens nearest to `text` (the mean of its tokens), itself excluded."""
    ids = word_ids(loaded.tokenizer, text)
    found = nearest(loaded.model, loaded.tokenizer, vector(loaded.model, ids), k, set(ids))
    return {"query": text, "ids": ids, "neighbours": found}


@torch.no_grad()
def analogy(loaded, a: str, b: str, c: str, k: int = 10) -> dict:
    """`sol embed analogy`: nearest to a - b + c (rei - homem + mulher), excluding the tokens of a, b and c."""
    tok, model = loaded.tokenizer, loaded.model
    ia, ib, ic = word_ids(tok, a, "--a"), word_ids(tok, b, "--b"), word_ids(tok, c, "--c")
    v = vector(model, ia) - vector(model, ib) + vector(model, ic)
    found = nearest(model, tok, v, k, set(ia) | set(ib) | set(ic))
    return {"a": a, "b": b, "c": c, "ids": {"a": ia, "b": ib, "c": ic}, "neighbours": found}


@torch.no_grad()
def word_map(loaded, words: list[str], method: str = "pca") -> dict:
    """2-D coordinates for `words`. PCA reports the share of variance its two axes keep, so the picture
    says what it loses; UMAP (when umap-learn is installed) keeps neighbourhoods instead and has no such share."""
    words = [w for w in words if w.strip()]
    if len(words) < 3:
        raise SolError("words: give at least 3 words to place on a map")
    tok, model = loaded.tokenizer, loaded.model
    X = torch.stack([vector(model, word_ids(tok, w, f"word {w!r}")) for w in words])
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise SolError("--method umap: umap-learn is not installed; pip install umap-learn, or use pca") from None
        xy = umap.UMAP(n_components=2, n_neighbors=min(15, len(words) - 1), random_state=0).fit_transform(X.numpy())
        return {"words": words, "xy": [[float(a), float(b)] for a, b in xy], "method": "umap",
                "explained_variance": None}
    if method != "pca":
        raise SolError(f"--method: {method!r}; use pca or umap")
    centred = X - X.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    share = (s ** 2) / (s ** 2).sum().clamp_min(1e-30)
    return {"words": words, "xy": xy.tolist(), "method": "pca",
            "explained_variance": [float(share[0]), float(share[1]) if len(share) > 1 else 0.0]}


def locate(tok, sentence: str, word: str) -> tuple[list[int], list[int]]:
    """(ids of the sentence, positions of the tokens that cover the first occurrence of `word`)."""
    at = sentence.find(word)
    if at < 0:
        at = sentence.lower().find(word.lower())
    if at < 0:
        raise SolError(f"--word: {word!r} is not in the sentence {sentence!r}; use a word that appears in both")
    enc = tok.encode(sentence, add_special_tokens=False)
    end = at + len(word)
    where = [i for i, (s, e) in enumerate(enc.offsets) if s < end and e > at]
    return enc.ids, where


@torch.no_grad()
def in_context(loaded, word: str, sentences: list[str]) -> dict:
    """`sol embed context`: the cosine between `word`'s hidden state in two sentences, per layer.
    Layer 0 is the token embedding itself (before any position is added), identical in both; layer l
    is the residual stream after block l. Where the word spans tokens, the mean over them."""
    if len(sentences) != 2:
        raise SolError(f"--sentence: give exactly two sentences, not {len(sentences)}")
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.config
    states = []
    for s in sentences:
        ids, where = locate(tok, s, word)
        if len(ids) > cfg.context:
            raise SolError(f"--sentence: {len(ids)} tokens, longer than this model's context of {cfg.context}")
        res = model.residuals(torch.tensor([ids], device=model.device))
        layers = [matrix(model)[[ids[i] for i in where]].mean(0)]
        layers += [r[0, where].float().mean(0) for r in res[1:]]
        states.append(layers)
    cos = [float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(*states)]
    return {"word": word, "sentences": sentences, "layers": list(range(len(cos))), "cosine": cos}


@torch.no_grad()
def positions(loaded, n: int = 64) -> dict:
    """Box 7. Learned positions: the first n position vectors and their cosine-similarity matrix.
    RoPE: each dimension pair's rotation frequency (radians per position) and wavelength in positions."""
    model, cfg = loaded.model, loaded.config
    if model.pos_embed is not None:
        P = model.pos_embed.weight.detach().float()[:n]
        Pn = F.normalize(P, dim=-1)
        return {"kind": "learned", "vectors": P.tolist(), "cosine": (Pn @ Pn.T).tolist()}
    inv_freq, _ = rope_frequencies(cfg)
    return {"kind": "rope", "frequencies": inv_freq.tolist(),
            "wavelengths": (2 * torch.pi / inv_freq).tolist()}
