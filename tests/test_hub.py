"""Getting models from the Hub (core/hub, `sol models search/get`, the Get models view): the real
huggingface_hub client against a local stand-in of the Hub's HTTP API (tests/hub_standin.py), HF_ENDPOINT
pointing at it, a fresh HF_HOME for each test (conftest.isolated_home)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import FOLDER_REPO, GATED_REPO, GGUF_REPO, MAMBA_REPO, StandIn, build_repos

F32, Q8 = "tiny-llama-F32.gguf", "tiny-llama-Q8_0.gguf"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return {r.id: r for r in build_repos(tmp_path_factory.mktemp("hubrepos"))}


@pytest.fixture
def hub(repos, monkeypatch):
    h = StandIn()
    for r in repos.values():
        h.add(r)
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SOL_HUB_FREE_MEMORY", raising=False)
    monkeypatch.delenv("SOL_HUB_FREE_DISK", raising=False)
    yield h
    h.close()


def sol(*args, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sol.core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run(capsys, *args) -> subprocess.CompletedProcess:
    """`sol ARGS` in this process (no interpreter to start): for the checks that need no fresh process."""
    from sol.core.cli import main
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def one_error(r) -> str:
    """The failure's one `error:` line (what get said it was doing may come before it, on stderr too)."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 1 and len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
    return errors[0]


def cache(isolated_home) -> Path:
    return isolated_home / "hf" / "hub"


def listed(env: dict | None = None) -> dict:
    r = sol("models", "list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return {m["name"]: m for m in json.loads(r.stdout)}


def generates(model: str, env: dict | None = None) -> str:
    r = sol("generate", "--model", model, "--prompt", "It is the", "--max-tokens", "6", "--temperature", "0",
            env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    return r.stdout


# ---- search ---------------------------------------------------------------------------------------
def test_search_lists_both_repositories_with_their_files_and_sizes(hub, repos):
    r = sol("models", "search", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    found = {e["repo"]: e for e in json.loads(r.stdout)}
    assert set(found) == {FOLDER_REPO, GGUF_REPO, MAMBA_REPO, GATED_REPO}
    keys = ["repo", "format", "parameters", "downloads", "likes", "loadable", "why_not", "files"]
    assert all(list(e) == keys for e in found.values())

    folder = found[FOLDER_REPO]
    assert folder["format"] == "safetensors" and folder["loadable"] and folder["why_not"] is None
    assert folder["parameters"] == repos[FOLDER_REPO].parameters and folder["downloads"] == 300
    sizes = {f["name"]: f["size"] for f in folder["files"]}
    # What a folder needs, with its sizes; not the README nor the pickle beside the safetensors.
    assert sizes == {n: len(repos[FOLDER_REPO].files[n]) for n in
                     ("model.safetensors", "tokenizer.json", "generation_config.json", "config.json")}

    gguf = found[GGUF_REPO]
    assert gguf["format"] == "gguf" and gguf["loadable"]
    quants = {f["quant"]: f["size"] for f in gguf["files"]}
    assert quants == {"F32": len(repos[GGUF_REPO].files[F32]), "Q8_0": len(repos[GGUF_REPO].files[Q8]),
                      "IQ4_XS": 64}

    assert not found[MAMBA_REPO]["loadable"] and "model_type 'mamba' is not supported" in found[MAMBA_REPO]["why_not"]

    text = sol("models", "search", "tiny", "--gguf")
    assert text.returncode == 0, text.stderr
    assert GGUF_REPO in text.stdout and FOLDER_REPO + " " not in text.stdout
    assert "Q8_0" in text.stdout and "1.1 MiB" in text.stdout and "3.9 MiB" in text.stdout
    assert "IQ4_XS" in text.stdout and "not loadable: IQ4_XS" in text.stdout   # listed, with the reason


def test_quantization_names_and_what_sol_reads():
    from sol.core.hub.catalog import quant_of, quant_problem
    assert quant_of("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("qwen2.5-0.5b-instruct-q8_0.gguf") == "Q8_0"
    assert quant_of("model.F16.gguf") == "F16"
    assert quant_of("Llama-3.2-1B-Instruct-IQ4_XS.gguf") == "IQ4_XS"
    assert quant_of("big-Q4_K_M-00001-of-00003.gguf") == "Q4_K_M"
    assert quant_of("model.gguf") is None
    assert quant_problem("Q4_K_M") is None and quant_problem("Q6_K") is None and quant_problem("BF16") is None
    assert "IQ4_XS" in quant_problem("IQ4_XS") and quant_problem("Q4_0_4_4") is not None


# ---- get ------------------------------------------------------------------------------------------
def test_get_a_folder_lands_in_the_cache_is_listed_and_generates(hub, repos, isolated_home):
    r = sol("models", "get", FOLDER_REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == FOLDER_REPO
    snap = next((cache(isolated_home) / "models--sol-test--tiny-llama" / "snapshots").iterdir())
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json"]
    assert (cache(isolated_home) / "models--sol-test--tiny-llama" / "refs" / "main").read_text() == \
        repos[FOLDER_REPO].sha   # the cache's own layout: transformers and llama.cpp find it too
    fetched = {g["path"].rsplit("/", 1)[-1] for g in hub.gets(FOLDER_REPO)}
    assert "README.md" not in fetched and "pytorch_model.bin" not in fetched
    assert listed()[FOLDER_REPO]["format"] == "hf"
    generates(FOLDER_REPO)
    again = sol("models", "get", FOLDER_REPO)   # all there: nothing fetched twice
    assert again.returncode == 0, again.stderr
    assert len([g for g in hub.gets(FOLDER_REPO, "model.safetensors") if g["range"] is None]) == 1


def test_get_quant_downloads_that_one_gguf_file_and_it_generates(hub, repos, isolated_home):
    r = sol("models", "get", GGUF_REPO, "--quant", "Q8_0")
    assert r.returncode == 0, r.stderr
    name = f"{GGUF_REPO}/{Q8}"
    assert r.stdout.split()[0] == name
    # One file's bytes (the header read for the fit check is a Range request of the same file), nothing else.
    assert {g["path"].rsplit("/", 1)[-1] for g in hub.gets(GGUF_REPO)} == {Q8}
    blobs = list((cache(isolated_home) / "models--sol-test--tiny-llama-GGUF" / "blobs").iterdir())
    assert [b.name for b in blobs] == [hashlib.sha256(repos[GGUF_REPO].files[Q8]).hexdigest()]
    m = listed()[name]
    assert m["format"] == "gguf" and m["quantization"] == "Q8_0"
    generates(name)


def test_get_refuses_what_it_cannot_load_or_choose(hub, capsys):
    for args, words in [((MAMBA_REPO,), "model_type 'mamba' is not supported"),
                        ((GGUF_REPO, "--quant", "IQ4_XS"), "Sol reads GGUF files of the types"),
                        ((GGUF_REPO, "--quant", "Q5_K_M"), "no file of that quantization"),
                        ((FOLDER_REPO, "--quant", "Q8_0"), "safetensors repository"),
                        (("sol-test/nope",), "no repository 'sol-test/nope'")]:
        r = run(capsys, "models", "get", *args)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
        assert words in r.stderr, r.stderr


def test_a_gated_repository_says_where_to_accept_its_licence(hub, isolated_home, capsys):
    r = run(capsys, "models", "get", GATED_REPO)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "gated" in r.stderr and f"{hub.url}/{GATED_REPO}" in r.stderr and "HF_TOKEN" in r.stderr
    assert GATED_REPO not in listed()
    ok = sol("models", "get", GATED_REPO, env={"HF_TOKEN": "hf_test"})
    assert ok.returncode == 0, ok.stderr


# ---- resume and checksums -------------------------------------------------------------------------
def test_a_cut_download_fails_then_the_next_get_resumes_it_with_the_right_checksum(hub, repos, isolated_home):
    data = repos[GGUF_REPO].files[F32]
    cut = 2 * 2**20 + 300_000      # past two of the 1 MiB pieces Sol reads, well before the end
    assert len(data) > cut + 2**20
    hub.cut(GGUF_REPO, F32, cut)
    r = sol("models", "get", GGUF_REPO, "--quant", "F32")
    assert "run the same get again to resume" in one_error(r)
    # The library tried to resume within that call (a Range request) and was refused.
    assert any(g["range"] and g["range"] != "bytes=0-1048575" for g in hub.gets(GGUF_REPO, F32))
    blobs = cache(isolated_home) / "models--sol-test--tiny-llama-GGUF" / "blobs"
    partial = blobs / (hashlib.sha256(data).hexdigest() + ".incomplete")
    kept = partial.stat().st_size
    assert 0 < kept <= cut and data[:kept] == partial.read_bytes()
    assert f"{GGUF_REPO}/{F32}" not in listed()      # a partial download is no model

    hub.heal()
    before = len(hub.log)
    r = sol("models", "get", GGUF_REPO, "--quant", "F32")
    assert r.returncode == 0, r.stderr
    after = hub.gets(GGUF_REPO, F32, since=before)
    assert [g["range"] for g in after if g["range"] != "bytes=0-1048575"] == [f"bytes={kept}-"], after
    assert not partial.exists()
    blob = blobs / hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert f"{GGUF_REPO}/{F32}" in listed()


def test_ctrl_c_keeps_the_part_fetched_and_the_next_get_resumes_it(hub, repos, isolated_home):
    import signal
    import time
    data = repos[GGUF_REPO].files[F32]
    hub.slow(GGUF_REPO, F32, 0.05)     # ~1.3 MB/s: time to press Ctrl-C mid-file
    partial = (cache(isolated_home) / "models--sol-test--tiny-llama-GGUF" / "blobs" /
               (hashlib.sha256(data).hexdigest() + ".incomplete"))
    p = subprocess.Popen([sys.executable, "-m", "sol.core.cli", "models", "get", GGUF_REPO, "--quant", "F32"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not (partial.is_file() and partial.stat().st_size >= 2**20) and time.monotonic() < end:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.splitlines()[-1] == "error: interrupted", err
    kept = partial.stat().st_size
    assert 2**20 <= kept < len(data) and data[:kept] == partial.read_bytes()

    hub.pauses.clear()
    before = len(hub.log)
    r = sol("models", "get", GGUF_REPO, "--quant", "F32")
    assert r.returncode == 0, r.stderr
    assert [g["range"] for g in hub.gets(GGUF_REPO, F32, since=before) if g["range"] != "bytes=0-1048575"] == \
        [f"bytes={kept}-"]
    assert f"{GGUF_REPO}/{F32}" in listed()


def test_a_corrupt_download_is_removed_and_never_listed(hub, isolated_home):
    hub.spoil(FOLDER_REPO, "model.safetensors")
    r = sol("models", "get", FOLDER_REPO)
    line = one_error(r)
    assert "sha256" in line and "removed" in line
    repo_dir = cache(isolated_home) / "models--sol-test--tiny-llama"
    assert not any(p.is_file() for p in (repo_dir / "blobs").iterdir())
    assert not (repo_dir / "snapshots").exists() or not any((repo_dir / "snapshots").rglob("*.safetensors"))
    assert FOLDER_REPO not in listed()


# ---- fit check ------------------------------------------------------------------------------------
def written(isolated_home) -> list:
    hub_cache = cache(isolated_home)
    return sorted(p.name for p in hub_cache.iterdir()) if hub_cache.exists() else []


@pytest.mark.parametrize("knob, words", [("SOL_HUB_FREE_MEMORY", "of memory"), ("SOL_HUB_FREE_DISK", "on the disk")])
def test_a_model_that_does_not_fit_is_refused_with_the_numbers_and_nothing_is_written(hub, isolated_home, knob,
                                                                                      words, capsys, monkeypatch):
    monkeypatch.setenv(knob, "1000")
    r = run(capsys, "models", "get", GGUF_REPO, "--quant", "F32")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert words in r.stderr and "1000 B is free" in r.stderr and "nothing was downloaded" in r.stderr
    if knob == "SOL_HUB_FREE_DISK":
        assert "3.9 MiB" in r.stderr     # the file's size
    else:                                # its weights as stored and the KV cache of its 256 tokens, at float32
        assert "3.9 MiB of weights" in r.stderr and "KV cache for 256 tokens" in r.stderr
    assert written(isolated_home) == []
    assert not [g for g in hub.gets(GGUF_REPO) if g["range"] is None]


def test_the_memory_check_counts_dtype_and_context():
    from sol.core.hub.fit import needs
    from sol.core.model.config import ModelConfig
    import torch
    cfg = ModelConfig(vocab_size=1000, n_layer=4, n_head=4, n_kv_head=2, d_model=256, context=32768,
                      positions="rope", norm="rmsnorm", mlp="swiglu")
    entry = {"repo": "o/r", "format": "safetensors"}
    files = [{"name": "model.safetensors", "size": 10_000_000}]
    cpu = torch.device("cpu")
    auto = needs(entry, files, cfg, "auto", None, cpu)
    assert auto["weights"] == 10_000_000 and auto["context"] == 4096   # as stored; the context capped
    assert auto["kv_cache"] == 2 * 4 * 2 * 64 * 4096 * 4
    half = needs(entry, files, cfg, "bfloat16", 1000, cpu)
    assert half["context"] == 1000 and half["kv_cache"] == 2 * 4 * 2 * 64 * 1000 * 2
    assert half["weights"] < needs(entry, files, cfg, "float32", 1000, cpu)["weights"]


# ---- offline --------------------------------------------------------------------------------------
def test_offline_search_and_an_uncached_get_fail_in_one_line_and_a_cached_model_loads(hub, isolated_home):
    assert sol("models", "get", GGUF_REPO, "--quant", "Q8_0").returncode == 0
    off = {"HF_HUB_OFFLINE": "1"}
    before = len(hub.log)
    r = sol("models", "search", "tiny", env=off)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "HF_HUB_OFFLINE=1" in r.stderr
    r = sol("models", "get", FOLDER_REPO, env=off)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "HF_HUB_OFFLINE=1" in r.stderr and "not in the Hugging Face cache" in r.stderr
    r = sol("models", "get", GGUF_REPO, "--quant", "Q8_0", env=off)
    assert r.returncode == 0, r.stderr
    name = f"{GGUF_REPO}/{Q8}"
    assert r.stdout.split()[0] == name
    assert name in listed(off)
    generates(name, off)
    assert len(hub.log) == before        # offline: the Hub was never asked


def test_without_a_network_get_fails_in_one_line_unless_the_model_is_cached(hub, isolated_home):
    assert sol("models", "get", GGUF_REPO, "--quant", "Q8_0").returncode == 0
    gone = {"HF_ENDPOINT": hub.url}
    hub.close()                          # nothing listens there any more
    r = sol("models", "get", FOLDER_REPO, env=gone)
    line = one_error(r)
    assert "cannot reach" in line and "not in the Hugging Face cache" in line
    r = sol("models", "get", GGUF_REPO, "--quant", "Q8_0", env=gone)
    assert r.returncode == 0 and "cannot reach" in r.stderr and "using the cached copy" in r.stderr, r.stderr
    assert r.stdout.split()[0] == f"{GGUF_REPO}/{Q8}"


# ---- the Get models view --------------------------------------------------------------------------
def test_get_models_view_searches_downloads_with_progress_cancels_one_and_completes_another(hub, qtbot,
                                                                                              isolated_home):
    from PySide6.QtCore import Qt

    from sol.app.main import build_window
    win, ctx = build_window()
    qtbot.addWidget(win)
    win.show()
    assert win.show_panel("get")
    panel = win.panel("get")
    panel.query.setText("tiny")
    qtbot.mouseClick(panel.search_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: panel.table.rowCount() == 4 and panel.is_ready(), timeout=30_000)
    repos = [e["repo"] for e in panel.results]
    row = repos.index(GGUF_REPO)
    cells = [panel.table.item(row, c).text() for c in range(panel.table.columnCount())]
    assert cells[1] == "llama" and cells[3] == "gguf" and cells[4] == "Q8_0, F32" and cells[6] == "✓ fits"
    assert cells[7] == "200" and cells[8] == "3"
    assert panel.table.item(repos.index(MAMBA_REPO), 6).text() == "✗ Sol cannot run it"

    panel.table.selectRow(row)
    assert panel.file.count() == 2            # the two files Sol reads, not IQ4_XS
    hub.slow(GGUF_REPO, F32, 0.05)            # ~1.3 MB/s: the 4 MB file takes a few seconds
    panel.file.setCurrentIndex(panel.file.findData(F32))
    qtbot.mouseClick(panel.download_btn, Qt.LeftButton)
    big = ctx.downloads.items[-1]
    bar, buttons = panel.row_widgets(big)
    qtbot.waitUntil(lambda: 0 < bar.value() < bar.maximum(), timeout=30_000)   # progress, visible mid-file
    assert big.state == "running" and "MiB" in panel.downloads.item(0, 2).text()

    assert win.show_panel("models")           # another panel: the queue goes on
    panel.file.setCurrentIndex(panel.file.findData(Q8))
    panel.download_selected()
    small = ctx.downloads.items[-1]
    assert small.state == "queued"            # one at a time
    qtbot.mouseClick(buttons.cancel, Qt.LeftButton)
    qtbot.waitUntil(lambda: big.state == "cancelled", timeout=30_000)
    qtbot.waitUntil(lambda: small.state == "done", timeout=60_000)
    assert win.show_panel("get") and win.panel("get") is panel
    _, small_buttons = panel.row_widgets(small)
    assert not small_buttons.load.isHidden() and buttons.load.isHidden() and buttons.cancel.isHidden()
    assert panel.row_widgets(small)[0].value() == 1000

    blobs = cache(isolated_home) / "models--sol-test--tiny-llama-GGUF" / "blobs"
    assert not list(blobs.glob("*.incomplete"))    # the cancelled file is not kept
    from sol.core.formats.registry import list_models
    names = {m["name"] for m in list_models()}
    assert f"{GGUF_REPO}/{Q8}" in names and f"{GGUF_REPO}/{F32}" not in names
    qtbot.mouseClick(small_buttons.load, Qt.LeftButton)
    qtbot.waitUntil(lambda: ctx.loaded is not None, timeout=120_000)
    assert ctx.loaded.name == Q8 and ctx.loaded.path == Path(small.result["path"]).resolve()


def test_get_models_view_asks_a_gated_repository_for_a_token(hub, qtbot, monkeypatch):
    from PySide6.QtWidgets import QInputDialog

    from sol.app.main import build_window
    asked = []
    monkeypatch.setattr(QInputDialog, "getText", staticmethod(lambda *a, **k: (asked.append(a[2]), ("hf_x", True))[1]))
    win, ctx = build_window()
    qtbot.addWidget(win)
    win.show()
    win.show_panel("get")
    panel = win.panel("get")
    item = ctx.downloads.add(GATED_REPO)
    qtbot.waitUntil(lambda: item.state == "done", timeout=60_000)
    assert asked and f"{hub.url}/{GATED_REPO}" in asked[0]     # where to accept the licence
    assert item.token == "hf_x"
