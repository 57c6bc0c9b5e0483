"""The Compare panel: 2 to 4 models, adapters or checkpoints answer one prompt side by side, all streaming at
once with the same seed and sampling (sol.core.evaluate.compare, on a worker thread). In blind mode the
columns are A, B, ... until you vote; the vote and the answers go to the store, then the names show, and the
table on the right counts each pair's wins (with Elo and its interval once there are enough votes)."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton,
                               QScrollArea, QSizePolicy, QSplitter, QTableWidgetItem, QTextBrowser, QVBoxLayout,
                               QWidget)

from sol.app.kit import answer_markdown, page, sampling_controls, table
from sol.core.errors import SolError
from sol.core.evaluate.compare import blind_order, compare, lineage, load
from sol.core.evaluate.ratings import MIN_VOTES, elo, win_rates
from sol.core.evaluate.results import lineage as stages_of
from sol.core.formats.registry import list_models

LABELS = "ABCD"
NONE = "—"                # a picker left empty
FLUSH_MS = 50             # streamed text is painted at most this often
VOTES = [("tie", "Tie"), ("both_bad", "Both bad")]


class Column(QFrame):
    """One answer: its label (or model), the text as it streams, then as Markdown; tokens and tok/s."""

    def __init__(self):
        super().__init__()
        self.setObjectName("card")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 8, 10, 8)
        self.head = QLabel()
        self.head.setObjectName("h2")
        self.head.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)   # a long name never widens it
        self.body = QTextBrowser()
        self.body.setOpenExternalLinks(True)
        self.stats = QLabel()
        self.stats.setObjectName("stat")
        lay.addWidget(self.head)
        lay.addWidget(self.body, 1)
        lay.addWidget(self.stats)
        self.text, self.shown, self.tokens = "", 0, 0

    def reset(self, title: str) -> None:
        self.head.setText(title)
        self.body.clear()
        self.stats.setText("")
        self.text, self.shown, self.tokens = "", 0, 0

    def add(self, text: str) -> None:
        self.text += text
        self.tokens += 1

    def paint(self) -> None:
        """While streaming: append the new text as plain text (re-rendering Markdown each frame costs more
        the longer the answer gets); finish() renders the Markdown once."""
        if self.shown < len(self.text):
            cur = QTextCursor(self.body.document())
            cur.movePosition(QTextCursor.End)
            cur.insertText(self.text[self.shown:])
            self.shown = len(self.text)
            self.stats.setText(f"{self.tokens} tokens …")

    def finish(self, text: str) -> None:
        self.text = text
        self.shown = len(text)
        self.body.setMarkdown(answer_markdown(text) if text else "*(no text)*")

    def shown_text(self) -> str:
        return self.body.toPlainText()


class ComparePanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.worker = None
        self.cache: dict[str, object] = {}    # name or path -> LoadedModel, kept for the next comparison
        self.run: dict | None = None          # the comparison on screen
        self.comparison_id: int | None = None

        split = QSplitter()
        split.addWidget(self._main())
        split.addWidget(self._side())
        split.setStretchFactor(0, 1)
        split.setSizes([1000, 360])
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)
        self._flush = QTimer(self, interval=FLUSH_MS)
        self._flush.timeout.connect(self._paint)
        ctx.model_changed.connect(lambda _lm: self.refresh_choices())
        ctx.models_changed.connect(self.refresh_choices)
        self.refresh_choices()
        self.refresh_ratings()
        self._buttons()

    # ---- layout ------------------------------------------------------------
    def _main(self) -> QWidget:
        w = QWidget()
        lay = page(w, "Compare", "Two to four models, adapters or checkpoints answer the same prompt at once, with "
                   "the same seed and sampling. Blind: the columns are A, B, … until you vote.")
        row = QHBoxLayout()
        self.pickers: list[QComboBox] = []
        for k in range(len(LABELS)):
            p = QComboBox()
            p.setEditable(True)    # a name from `sol models list` or a folder may be typed too
            p.setMinimumContentsLength(14)
            p.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            p.setToolTip(f"model {LABELS[k]}: the models list, the loaded model's adapters, checkpoints and parents")
            self.pickers.append(p)
            row.addWidget(p, 1)
        lay.addLayout(row)
        opts = QHBoxLayout()
        self.blind = QCheckBox("blind (A, B, … until you vote)")
        self.blind.setChecked(bool(self.ctx.setting("compare.blind", True)))
        self.chat = QCheckBox("chat (each model's chat template, tools included)")
        self.chat.setChecked(bool(self.ctx.setting("compare.chat", False)))
        opts.addWidget(self.blind)
        opts.addWidget(self.chat)
        opts.addStretch(1)
        lay.addLayout(opts)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("The prompt every model answers (raw text to continue, or with chat a user "
                                       "message)")
        self.prompt.setFixedHeight(64)
        lay.addWidget(self.prompt)
        buttons = QHBoxLayout()
        self.status = QLabel()
        self.status.setObjectName("stat")
        self.status.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.stop_btn = QPushButton("■ Stop")
        self.go_btn = QPushButton("Compare")
        self.go_btn.setObjectName("primary")
        buttons.addWidget(self.status, 1)
        buttons.addWidget(self.stop_btn)
        buttons.addWidget(self.go_btn)
        lay.addLayout(buttons)
        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.error.hide()
        lay.addWidget(self.error)
        cols = QSplitter()
        self.columns = [Column() for _ in LABELS]
        for c in self.columns:
            cols.addWidget(c)
        lay.addWidget(cols, 1)
        votes = QHBoxLayout()
        self.vote_hint = QLabel("Which answer is better?")
        votes.addWidget(self.vote_hint)
        self.vote_btns: dict[str, QPushButton] = {}
        for outcome, text in [(x, x) for x in LABELS] + VOTES:
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, o=outcome: self.vote(o))
            self.vote_btns[outcome] = b
            votes.addWidget(b)
        votes.addStretch(1)
        lay.addLayout(votes)
        self.go_btn.clicked.connect(self.start)
        self.stop_btn.clicked.connect(self.stop)
        self._show_columns(2)
        return w

    def _side(self) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        lay.setContentsMargins(8, 20, 14, 14)
        saved = self.ctx.setting("compare.params", None)
        self.params = sampling_controls(saved if isinstance(saved, dict) else None)
        lay.addWidget(self.params)
        head = QLabel("Votes")
        head.setObjectName("h2")
        lay.addWidget(head)
        self.wins = table(["pair", "votes", "win rate", "tie / bad"])
        self.wins.setMinimumHeight(120)
        self.wins.setMaximumHeight(200)
        self.wins.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)   # a long pair's name is cut, not scrolled
        lay.addWidget(self.wins)
        self.elo_note = QLabel()
        self.elo_note.setObjectName("muted")
        self.elo_note.setWordWrap(True)
        lay.addWidget(self.elo_note)
        self.elo = table(["model", "Elo", "95 % interval", "votes"])
        self.elo.setMinimumHeight(100)
        self.elo.setMaximumHeight(200)
        self.elo.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        lay.addWidget(self.elo)
        lay.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(w)
        scroll.setMinimumWidth(300)
        return scroll

    def _show_columns(self, n: int) -> None:
        for k, c in enumerate(self.columns):
            c.setVisible(k < n)
        for k, label in enumerate(LABELS):
            self.vote_btns[label].setVisible(k < n)

    # ---- the models to choose from ----------------------------------------------
    def refresh_choices(self) -> None:
        lm = self.ctx.loaded
        self.ctx.run(choices, str(lm.path) if lm is not None else None, on_done=self._fill_choices,
                     on_error=self._choices_failed)

    def _choices_failed(self, e) -> None:
        self.show_error(f"the models list: {e}")

    def _fill_choices(self, entries: list[tuple[str, str]]) -> None:
        for k, p in enumerate(self.pickers):
            keep = p.currentText()
            p.blockSignals(True)
            p.clear()
            if k >= 2:
                p.addItem(NONE, None)
            for label, value in entries:
                p.addItem(label, value)
                p.setItemData(p.count() - 1, value, Qt.ToolTipRole)
            i = p.findText(keep) if keep else -1
            p.setCurrentIndex(i if i >= 0 else (0 if k >= 2 else min(k, p.count() - 1)))
            p.blockSignals(False)

    def chosen(self) -> list[tuple[str, str]]:
        """(name, name or path to load) of each picker in use: a listed entry, or what was typed."""
        out = []
        for p in self.pickers:
            text = p.currentText().strip()
            if not text or text == NONE:
                continue
            i = p.findText(text)
            if i < 0:     # a typed folder that the list holds: its listed name
                i = next((j for j in range(p.count()) if p.itemData(j) and same_path(p.itemData(j), text)), -1)
            value = p.itemData(i) if i >= 0 else None
            if value:
                p.setCurrentIndex(i)
            out.append((p.itemText(i) if value else text, value or text))
        return out

    # ---- a comparison ------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.worker is not None

    def _buttons(self) -> None:
        self.go_btn.setEnabled(not self.busy)
        self.stop_btn.setEnabled(self.busy)
        can_vote = self.comparison_id is not None and self.run is not None and self.run.get("vote") is None
        for b in self.vote_btns.values():
            b.setEnabled(can_vote)
        self.vote_hint.setEnabled(can_vote)

    def show_error(self, message: str) -> None:
        self.error.setText(message if message.startswith("error:") else f"error: {message}")
        self.error.show()

    def start(self) -> bool:
        if self.busy:
            return False
        self.error.hide()
        models, prompt = self.chosen(), self.prompt.toPlainText()
        if len(models) < 2:
            self.show_error(f"{len(models)} model{'' if len(models) == 1 else 's'} chosen: choose 2 to 4 models (or "
                            "adapters, or checkpoints) above")
            return False
        if not prompt.strip():
            self.show_error("no prompt: write what every model should answer")
            return False
        params = replace(self.params.generation_params(), explain=False)
        if params.sampling.seed is None:     # one seed for every column, so they sample alike
            params = replace(params, sampling=replace(params.sampling, seed=random.randrange(2**31)))
        # Keep only the copies this comparison uses: a model left out of it gives its memory back.
        self.cache = {v: lm for v, lm in self.cache.items() if any(v == value for _, value in models)}
        n, blind = len(models), self.blind.isChecked()
        order = blind_order(n) if blind else list(range(n))
        self.run = {"models": models, "prompt": prompt, "blind": blind, "chat": self.chat.isChecked(),
                    "order": order, "column": {m: k for k, m in enumerate(order)}, "answers": {}, "errors": {},
                    "lineage": {}, "seed": params.sampling.seed, "params": self.params.values(), "vote": None}
        self.comparison_id = None
        self._show_columns(n)
        for k in range(n):
            self.columns[k].reset(self._title(k))
        for key, value in (("compare.blind", blind), ("compare.chat", self.run["chat"]),
                           ("compare.params", self.params.values())):
            self.ctx.set_setting(key, value)
        self.status.setText("loading the models …")
        chat, plugins, store = self.run["chat"], self.ctx.plugins, self.ctx.store
        answers = (lambda cancel: self._answers(models, prompt, params, chat, plugins, store, cancel))
        self.worker = self.ctx.stream(answers, self._on_event, self._on_finished, self._on_error,
                                      may_wait=lambda ev: ev.get("type") == "token")   # tokens come in batches
        self._flush.start()
        self._buttons()
        return True

    def _title(self, k: int) -> str:
        """A column's label; its model's name too unless the comparison is blind and not yet voted on."""
        run = self.run
        name = run["models"][run["order"][k]][0]
        hidden = run["blind"] and run["vote"] is None
        return LABELS[k] if hidden else f"{LABELS[k]} · {name}"

    def _model(self, name: str, value: str):
        """The LoadedModel to answer as `value` (worker thread): the app's loaded model when it is that one and
        runs without an adapter, else a copy loaded once and kept."""
        lm = self.ctx.loaded
        if lm is not None and self.ctx.active_adapter is None and same_path(value, lm.path):
            return lm
        if value not in self.cache:
            try:
                self.cache[value] = load(value, self.ctx.device or "cpu")
            except SolError as e:
                msg = str(e)
                msg = msg.split(": ", 1)[1] if msg.startswith(f"--model {value}: ") else msg
                raise SolError(f"model {name!r}: {msg}; choose one from the list or give a model's folder") from None
        return self.cache[value]

    def _answers(self, models, prompt, params, chat, plugins, store, cancel):
        """The worker thread: load what is not loaded, then every answer's events."""
        loaded = []
        for i, (name, value) in enumerate(models):
            if cancel.is_set():
                return
            yield {"type": "loading", "model": i, "name": name}
            lm = self._model(name, value)
            info = lineage(lm)
            if not same_path(value, lm.path) and Path(value).expanduser().exists():   # an adapter on its base
                info["adapter"] = str(Path(value).expanduser().resolve())
            yield {"type": "loaded", "model": i, "lineage": info}
            loaded.append((name, lm))
        yield {"type": "started"}
        yield from compare(loaded, prompt, params, chat=chat, plugins=plugins, store=store, cancel=cancel)

    def _on_event(self, ev: dict) -> None:
        run, t = self.run, ev.get("type")
        if run is None:
            return
        if t == "token":
            self.columns[run["column"][ev["model"]]].add(ev.get("text", ""))
        elif t == "loading":
            self.status.setText(f"loading {ev['name']} …" if not run["blind"] else "loading the models …")
        elif t == "loaded":
            run["lineage"][ev["model"]] = ev["lineage"]
        elif t == "started":
            self.status.setText("answering …")
        elif t == "done":
            run["answers"][ev["model"]] = ev
            c = self.columns[run["column"][ev["model"]]]
            c.paint()
            c.finish(ev.get("text", ""))
            self._stats(run["column"][ev["model"]])
        elif t == "error":
            run["errors"][ev["model"]] = ev.get("message", "")
            k = run["column"][ev["model"]]
            self.columns[k].stats.setText("✗ failed")
            self.show_error(f"{LABELS[k] if run['blind'] else ev.get('name')}: {ev.get('message')}")

    def _stats(self, k: int) -> None:
        run = self.run
        a = run["answers"].get(run["order"][k])
        if a is None:
            return
        speed = "" if run["blind"] and run["vote"] is None else f" · {a['tokens_per_s']:.1f} tok/s"   # speed tells
        stop = " · stopped" if a.get("stop_reason") == "cancelled" else ""
        self.columns[k].stats.setText(f"{a['tokens']} tokens{speed}{stop}")

    def _paint(self) -> None:
        for c in self.columns:
            if c.isVisible():
                c.paint()

    def _on_error(self, e) -> None:
        self.show_error(str(e))

    def _on_finished(self) -> None:
        self._flush.stop()
        self._paint()
        stopped = self.worker is not None and self.worker.cancel.is_set()
        self.worker = None
        run = self.run
        done = len(run["answers"]) == len(run["models"]) and not run["errors"] and not stopped
        if done:
            self._keep()
        if self.comparison_id is not None:
            self.status.setText("vote: which answer is better?" if run["blind"] else "done; vote if you like")
        else:
            self.status.setText("stopped" if stopped else "")
        self._buttons()

    def _keep(self) -> None:
        """The answers in column order, with the models' names and lineage, into the store."""
        store, run = self.ctx.store, self.run
        if store is None:
            self.status.setText("not kept: the conversation store is not open")
            return
        answers = []
        for k, m in enumerate(run["order"]):
            a = run["answers"][m]
            answers.append({"model": run["models"][m][0], "text": a["text"], "lineage": run["lineage"].get(m),
                            "conversation_id": a.get("conversation_id")})
        settings = {**{k: v for k, v in run["params"].items() if k != "user_set"}, "seed": run["seed"],
                    "chat": run["chat"]}
        try:
            self.comparison_id = store.add_comparison(run["prompt"], answers, settings, blind=run["blind"])
        except Exception as e:   # the store must not take the panel down
            self.show_error(f"the comparison could not be kept: {e}")

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.status.setText("stopping …")

    # ---- votes ---------------------------------------------------------------------
    def vote(self, outcome: str) -> bool:
        """Keep the vote (a column's label, "tie" or "both_bad"), then show the models' names."""
        if self.comparison_id is None or self.run is None or self.run["vote"] is not None:
            return False
        try:
            self.ctx.store.vote(self.comparison_id, outcome)
        except Exception as e:
            self.show_error(str(e))
            return False
        self.run["vote"] = outcome
        for k in range(len(self.run["models"])):
            self.columns[k].head.setText(self._title(k))
            self._stats(k)
        said = {"tie": "a tie", "both_bad": "both bad"}.get(outcome, f"{outcome} is better")
        self.status.setText(f"voted: {said}")
        self._buttons()
        self.refresh_ratings()
        return True

    def refresh_ratings(self) -> None:
        store = self.ctx.store
        if store is None:
            return
        try:
            battles = store.battles()
        except Exception as e:
            self.elo_note.setText(f"votes could not be read: {e}")
            return
        self.ratings = None
        # Elo's bootstrap refits a few hundred times: off the GUI thread.
        # Bound methods, not lambdas: a panel closed meanwhile is disconnected, not painted after its deletion.
        self.ctx.run(ratings_of, battles, on_done=self._show_ratings, on_error=self._ratings_failed)

    def _ratings_failed(self, e) -> None:
        self.elo_note.setText(f"ratings: {e}")

    def _show_ratings(self, result) -> None:
        pairs, ratings, n = result
        self.ratings = result
        self.wins.setRowCount(0)
        for p in pairs:
            r = self.wins.rowCount()
            self.wins.insertRow(r)
            cells = [f"{p['a']} vs {p['b']}", str(p["n"]), f"{p['a_rate']:.0%} – {p['b_rate']:.0%}",
                     f"{p['ties']} / {p['both_bad']}"]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(f"{p['a']} won {p['a_wins']}, {p['b']} won {p['b_wins']} of {p['n']} votes; "
                                f"{p['ties']} ties, {p['both_bad']} both bad")
                self.wins.setItem(r, c, item)
        self.elo.setRowCount(0)
        if ratings is None:
            self.elo_note.setText(f"Elo with its 95 % interval after {MIN_VOTES} votes ({n} so far)."
                                  if n else "No votes yet.")
            self.elo.hide()
            return
        self.elo_note.setText(f"Elo from {n} pairwise results (Bradley–Terry; interval by bootstrap)")
        self.elo.show()
        for row in ratings:
            r = self.elo.rowCount()
            self.elo.insertRow(r)
            cells = [row["model"], f"{row['rating']:.0f}", f"{row['low']:.0f} – {row['high']:.0f}", str(row["votes"])]
            for c, text in enumerate(cells):
                self.elo.setItem(r, c, QTableWidgetItem(text))

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker.thread.wait(3000)


def ratings_of(battles: list) -> tuple:
    """(win rates per pair, Elo or None below MIN_VOTES, how many battles): a worker thread's work."""
    return win_rates(battles), elo(battles), len(battles)


def same_path(a, b) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError, TypeError):
        return False


def choices(loaded_path: str | None) -> list[tuple[str, str]]:
    """(label, name or path) of every model to compare, the loaded one's family first: the loaded model, its
    parents and checkpoints (sol.json's lineage), its adapters; then the rest of the models list."""
    models = [m for m in list_models() if "broken" not in m]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(label, path):
        key = str(Path(path).expanduser().resolve())
        if key not in seen:
            seen.add(key)
            out.append((label, str(path)))
    if loaded_path:
        here = next((m for m in models if same_path(m["path"], loaded_path)), None)
        family = stages_of(loaded_path)
        add(here["name"] if here else family[-1]["name"], loaded_path)
        for m in reversed(family[:-1]):
            listed = next((x for x in models if same_path(x["path"], m["path"])), None)
            add(listed["name"] if listed else m["name"], m["path"])
        for a in models:
            if a.get("format") == "lora" and (a.get("base") == (here or {}).get("name") or
                                              same_path(a.get("base") or "", loaded_path)):
                add(a["name"], a["path"])
    for m in models:
        add(m["name"], m["path"])
    return out
