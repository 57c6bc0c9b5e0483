"""Models: what is on disk, what is loaded, and the numbers that describe a model (the book's Fig. 78)."""
from __future__ import annotations

import shutil
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QHBoxLayout, QHeaderView, QLabel, QLineEdit, QMessageBox, QPushButton, QSpinBox,
                               QTableWidget, QTableWidgetItem, QWidget)

from .adapters import base_entry, is_adapter, with_adapters_under_bases
from .kit import page, table

COLUMNS = ["Name", "Format", "Architecture", "Parameters", "Stage", "Path"]


def model_details(path: str) -> dict:
    """The fields `sol models info` prints, plus lineage from sol.json."""
    from sol.core.formats.checkpoint import load_config
    from sol.core.formats.loaded import read_json
    d = Path(path)
    cfg, fmt = load_config(d)
    info = {"format": fmt, "architecture": cfg.architecture, "layers": cfg.n_layer, "d_model": cfg.d_model,
            "heads": cfg.n_head, "kv_heads": cfg.n_kv_head, "d_head": cfg.head_dim, "d_ff": cfg.d_ff,
            "context": cfg.context, "vocab_size": cfg.vocab_size, "parameters": cfg.n_params_estimate,
            "norm": cfg.norm, "positions": cfg.positions, "mlp": cfg.mlp}
    if (d / "sol.json").is_file():
        meta = read_json(d / "sol.json")
        info["parameters"] = meta.get("parameters", info["parameters"])
        info["stage"] = meta.get("stage", "base")
        info["parent"] = describe_parent(meta.get("parent"))
    return info


def adapter_details(path: str) -> dict:
    """What a LoRA adapter folder says about itself: its base, rank, scaling, targets, and sol.json's lineage."""
    from sol.core.formats.adapter import read_config
    from sol.core.formats.loaded import read_json
    d = Path(path)
    cfg = read_config(d)
    targets = cfg.get("target_modules")
    info = {"format": "lora (PEFT adapter)", "base": cfg.get("base_model_name_or_path"), "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"), "lora_dropout": cfg.get("lora_dropout"),
            "targets": ", ".join(targets) if isinstance(targets, list) else str(targets)}
    if (d / "sol.json").is_file():
        meta = read_json(d / "sol.json")
        info["stage"] = meta.get("stage", "?")
        info["steps"] = meta.get("steps", "?")
        info["parent"] = describe_parent(meta.get("parent"))
    return info


def describe_parent(parent) -> str:
    """sol.json's parent ({"name", "stage", "path", "sha256"}) as one line: name, stage, where."""
    if not parent:
        return "—"
    if not isinstance(parent, dict):
        return str(parent)
    name, stage, path = parent.get("name", "?"), parent.get("stage"), parent.get("path", "")
    return f"{name} ({stage}) · {path}" if stage and stage != name else f"{name} · {path}"


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def create_model(out: Path, preset_name: str, tokenizer_source: str, vocab: int, seed: int = 0) -> Path:
    """An untrained model from a preset; the tokenizer is copied from a model or trained on a text file."""
    import torch

    from sol.core.formats.checkpoint import save_model
    from sol.core.formats.tokenizer import Tokenizer, train_bpe, train_char
    from sol.core.model.config import padded_vocab, preset
    from sol.core.model.transformer import Transformer
    src = Path(tokenizer_source)
    if src.is_dir():
        tok = Tokenizer.from_file(src / "tokenizer.json")
    elif vocab <= 0:
        tok = train_char([src])
    else:
        tok = train_bpe([src], vocab)
    torch.manual_seed(seed)
    model = Transformer(preset(preset_name, vocab_size=padded_vocab(tok.id_limit)))
    return save_model(out, model, tok, {"name": out.name, "stage": "base", "preset": preset_name,
                                        "parent": None, "steps": 0})


def import_folder(src: Path) -> Path:
    from sol.core.errors import SolError
    from sol.core.formats.checkpoint import inspect
    from sol.core.formats.registry import models_dir
    if inspect(src) is None:
        raise SolError(f"{src}: not a model directory (needs config.json, *.safetensors and tokenizer.json)")
    dest = models_dir() / src.name
    if dest.exists():
        raise SolError(f"{dest}: a model of that name already exists; rename the folder first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest)
    return dest


class NewModelDialog(QDialog):
    def __init__(self, models: list[dict], parent=None):
        super().__init__(parent)
        from sol.core.model.config import PRESETS
        self.setWindowTitle("New untrained model")
        form = QFormLayout(self)
        self.name = QLineEdit("my-model")
        self.preset = QComboBox()
        for name, p in PRESETS.items():
            self.preset.addItem(f"{name}  ({p['n_layer']} layers, d_model {p['d_model']})", name)
        self.tokenizer = QComboBox()
        for m in models:
            self.tokenizer.addItem(f"tokenizer of {m['name']}", m["path"])
        self.tokenizer.addItem("train on a text file…", "")
        self.vocab = QSpinBox()
        self.vocab.setRange(0, 200_000)
        self.vocab.setValue(4096)
        self.vocab.setSpecialValueText("characters")
        self.vocab.setToolTip("BPE vocabulary size; 0 trains a character-level tokenizer")
        form.addRow("Name", self.name)
        form.addRow("Preset", self.preset)
        form.addRow("Tokenizer", self.tokenizer)
        form.addRow("Vocabulary (BPE)", self.vocab)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def values(self):
        src = self.tokenizer.currentData()
        if not src:
            src, _ = QFileDialog.getOpenFileName(self, "Text to train the tokenizer on", "", "Text (*.txt);;All (*)")
        return self.name.text().strip(), self.preset.currentData(), src, self.vocab.value()


class ModelsPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.models: list[dict] = []
        self._ready = False
        lay = page(self, "Models", "Sol models in your data folder, the starter model, and Hugging Face models "
                                   "in the local cache.", spacing=12)

        bar = QHBoxLayout()
        self.load_btn = QPushButton("Load")
        self.load_btn.setObjectName("primary")
        self.unload_btn = QPushButton("Unload")
        self.import_btn = QPushButton("Import folder…")
        self.new_btn = QPushButton("New from preset…")
        self.fine_tune_btn = QPushButton("Fine-tune…")
        self.fine_tune_btn.setToolTip("Train a LoRA adapter on this model with a chat JSONL (the Training panel); "
                                      "the adapter appears under the model here")
        self.refresh_btn = QPushButton("Refresh")
        for b in (self.load_btn, self.unload_btn, self.fine_tune_btn, self.import_btn, self.new_btn):
            bar.addWidget(b)
        bar.addStretch(1)
        bar.addWidget(self.refresh_btn)
        lay.addLayout(bar)

        self.table = table(COLUMNS)
        lay.addWidget(self.table, 2)

        details_title = QLabel("Details")
        details_title.setObjectName("h2")
        lay.addWidget(details_title)
        self.details = QTableWidget(0, 4)       # two key/value pairs per row: everything fits in view
        self.details.horizontalHeader().hide()
        self.details.verticalHeader().hide()
        self.details.setShowGrid(False)
        self.details.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.details.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.details.setFocusPolicy(Qt.NoFocus)
        lay.addWidget(self.details, 3)
        self.loaded_label = QLabel()
        self.loaded_label.setObjectName("muted")
        lay.addWidget(self.loaded_label)

        self.load_btn.clicked.connect(self.load_selected)
        self.unload_btn.clicked.connect(ctx.unload_model)
        self.import_btn.clicked.connect(self.import_clicked)
        self.new_btn.clicked.connect(self.new_clicked)
        self.refresh_btn.clicked.connect(self.refresh)
        self.fine_tune_btn.clicked.connect(self.fine_tune_selected)
        self.table.itemSelectionChanged.connect(self.show_details)
        self.table.itemDoubleClicked.connect(lambda *_: self.load_selected())
        ctx.model_changed.connect(self._on_model)
        ctx.models_changed.connect(self.refresh)        # a training run wrote a model or an adapter
        ctx.adapter_changed.connect(self._on_adapter)
        self._on_model(ctx.loaded)
        self.refresh()

    def is_ready(self) -> bool:
        return self._ready

    # ---- listing -----------------------------------------------------------
    def refresh(self):
        from sol.core.formats.registry import list_models
        # Broken folders too, each with its reason: one of them must not hide the others.
        self.ctx.run(list_models, True, on_done=self._fill, on_error=lambda e: self.ctx.status_message.emit(str(e)))

    def _fill(self, models: list[dict]):
        from sol.core.formats.checkpoint import inspect
        from sol.core.formats.loaded import read_json
        loaded = self.ctx.loaded
        if loaded is not None and not any(Path(m["path"]) == Path(loaded.path) for m in models):
            info = inspect(Path(loaded.path))   # loaded from elsewhere (--model PATH): list it too
            if info:
                models = [{"name": loaded.name, "path": str(loaded.path), **info}] + models
        rows = with_adapters_under_bases(models)
        self.models = [m for m, _ in rows]
        self.table.setRowCount(len(rows))
        for r, (m, depth) in enumerate(rows):
            if "broken" in m:
                for c, v in enumerate([("    └ " if depth else "") + m["name"], "", "broken", "", "", m["path"]]):
                    item = QTableWidgetItem(v)
                    item.setToolTip(m["broken"])
                    self.table.setItem(r, c, item)
                continue
            if is_adapter(m):
                self._adapter_row(r, m, models)
                continue
            stage = ""
            if m["format"] == "sol":
                try:
                    stage = read_json(Path(m["path"]) / "sol.json").get("stage", "")
                except Exception:
                    stage = "?"
            fmt = f"{m['format']} {m['quantization']}" if m.get("quantization") else m["format"]
            for c, v in enumerate([m["name"], fmt, m["architecture"], human(m["parameters"]), stage,
                                   m["path"]]):
                item = QTableWidgetItem(v)
                if c == 3:
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(r, c, item)
        models = self.models
        loaded = self.ctx.loaded
        for r, m in enumerate(models):
            if loaded is not None and Path(m["path"]) == Path(loaded.path):
                self.table.selectRow(r)
                break
        else:
            if models:
                self.table.selectRow(0)
        self._ready = True

    def _adapter_row(self, r: int, m: dict, models: list[dict]):
        """An adapter, indented under its base: `lora r16`, what it adapts, its own parameters, its stage."""
        from sol.core.formats.loaded import read_json
        base = base_entry(m, models)
        what = f"adapter of {base['name']}" if base else f"adapter; base not here: {m.get('base') or '?'}"
        stage, meta = "", Path(m["path"]) / "sol.json"
        try:
            stage = read_json(meta).get("stage", "") if meta.is_file() else ""
        except Exception:
            stage = "?"
        fmt = f"lora r{m['r']}" if m.get("r") else "lora"
        params = human(m["parameters"]) if m.get("parameters") else "?"
        for c, v in enumerate(["    └ " + m["name"], fmt, what, params, stage, m["path"]]):
            item = QTableWidgetItem(v)
            item.setForeground(QColor("#b8bdc8"))
            if c == 3:
                item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
            if c == 2 and base is None:
                item.setToolTip("Its adapter_config.json names a base model that is not in this list; get that "
                                "model (or import its folder) to use the adapter")
            self.table.setItem(r, c, item)

    def selected(self) -> dict | None:
        rows = self.table.selectionModel().selectedRows()
        return self.models[rows[0].row()] if rows else None

    def show_details(self):
        m = self.selected()
        if m is None:
            return
        try:
            info = adapter_details(m["path"]) if is_adapter(m) else model_details(m["path"])
        except Exception as e:
            info = {"error": str(e)}
        self.fine_tune_btn.setEnabled(not is_adapter(m) and "broken" not in m)
        info = {"name": m["name"], **info, "path": m["path"]}
        items = list(info.items())
        half = (len(items) + 1) // 2
        self.details.setRowCount(half)
        self.details.clearContents()
        for n, (k, v) in enumerate(items):
            val = f"{v:,}  ({human(v)})" if k == "parameters" else str(v)
            key = QTableWidgetItem(k)
            key.setForeground(QColor("#8b93a5"))
            r, c = n % half, 2 * (n // half)
            self.details.setItem(r, c, key)
            self.details.setItem(r, c + 1, QTableWidgetItem(val))

    # ---- actions -----------------------------------------------------------
    def load_selected(self):
        m = self.selected()
        if m is None:
            return
        if not is_adapter(m):
            self.ctx.load_model(m["path"])
            return
        # An adapter: its base (loaded once; kept when it is the loaded model), then the adapter on it.
        base = base_entry(m, self.models)
        base_path = base["path"] if base else m.get("base") or ""
        if not base_path or (base is None and not Path(base_path).expanduser().exists()):
            self._error(f"{m['path']}: its base model {m.get('base')!r} is not on this disk; get that model "
                        "(or import its folder), then load the adapter")
            return
        loaded = self.ctx.loaded
        if loaded is not None and Path(loaded.path).resolve() == Path(base_path).expanduser().resolve():
            self.ctx.use_adapter(m["path"])
        else:
            self.ctx.load_model(base_path, on_done=lambda _lm: self.ctx.use_adapter(m["path"]))

    def fine_tune_selected(self):
        """Open the Training panel set up to train a LoRA adapter on the selected model."""
        m = self.selected()
        if m is None or is_adapter(m) or "broken" in m:
            return
        self.ctx.fine_tune(m)

    def _on_model(self, loaded):
        if loaded is not None and self._ready and not any(Path(m["path"]) == Path(loaded.path) for m in self.models):
            self.refresh()
        self.unload_btn.setEnabled(loaded is not None)
        adapter = f" with adapter {self.ctx.active_adapter}" if loaded and self.ctx.active_adapter else ""
        self.loaded_label.setText(f"Loaded: {loaded.name}{adapter}  ({loaded.path})" if loaded else "No model loaded.")

    def _on_adapter(self, _name):
        self._on_model(self.ctx.loaded)

    def import_clicked(self):
        d = QFileDialog.getExistingDirectory(self, "Model folder to import")
        if d:
            self.ctx.run(import_folder, Path(d), on_done=lambda p: (self.refresh(), self.ctx.status_message.emit(
                f"imported {p}")), on_error=self._error)

    def new_clicked(self):
        dlg = NewModelDialog([m for m in self.models if "broken" not in m], self)
        if dlg.exec() != QDialog.Accepted:
            return
        name, preset_name, src, vocab = dlg.values()
        if not name or not src:
            return
        from sol.core.formats.registry import models_dir
        out = models_dir() / name
        if out.exists():
            self._error(f"{out} already exists; choose another name")
            return
        self.ctx.status_message.emit(f"creating {name} from preset {preset_name} …")
        self.ctx.run(create_model, out, preset_name, src, vocab,
                     on_done=lambda p: (self.refresh(), self.ctx.status_message.emit(f"created {p}")),
                     on_error=self._error)

    def _error(self, e):
        QMessageBox.warning(self, "Sol", str(e))
