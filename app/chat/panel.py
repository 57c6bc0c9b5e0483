"""The Chat panel: conversations on the left, the conversation in the middle, sampling and
"why this token?" on the right. Generation runs in a StreamWorker (its own QThread) with a
stop flag; tokens arrive as signals and are painted at most every 50 ms."""
from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QInputDialog, QLabel, QLineEdit, QListWidget, QListWidgetItem,
                               QMessageBox, QPlainTextEdit, QPushButton, QScrollArea, QSizePolicy, QSplitter,
                               QVBoxLayout, QWidget)

from ..adapters import adapters_for
from .consent import Consent, ConsentBar
from .explain import ExplainView
from .messages import AnswerBubble, Bubble, Notice, ToolCard, UserBubble
from .params import ParamsView

FLUSH_MS = 50
SPARE = 8           # dropped bubbles of each kind kept for the next messages instead of built anew


class ChatPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.session = None
        self.conversation_id = None
        self.worker = None
        self.answer: AnswerBubble | None = None
        self.cards: list[ToolCard] = []
        self.bubbles: list[QWidget] = []
        self.spare: dict[type, list[QWidget]] = {}
        self._dirty = False

        split = QSplitter()
        split.addWidget(self._conversations())
        split.addWidget(self._center())
        split.addWidget(self._side())
        split.setSizes([230, 700, 300])
        split.setStretchFactor(1, 1)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)

        self._flush = QTimer(self, interval=FLUSH_MS)
        self._flush.timeout.connect(self._paint)
        ctx.model_changed.connect(self._on_model)
        ctx.models_changed.connect(self.refresh_adapters)
        ctx.adapter_changed.connect(self._on_adapter)
        ctx.adapter_loading.connect(self._on_adapter_loading)
        ctx.adapter_failed.connect(self._on_adapter_failed)
        self._on_model(ctx.loaded)
        # One bubble of each kind built and styled now, at start-up, rather than at the first message.
        for w in (self._new_user(), self._new_answer(), ToolCard("", "")):
            self._keep(w)
            w.ensurePolished()
        self.refresh_list()
        self._reopen_last()

    def _reopen_last(self):
        cid = self.ctx.setting("chat.last_conversation")
        if cid is not None and self.ctx.store is not None:
            try:
                self.open_conversation(int(cid))
            except Exception:   # deleted meanwhile: start a new chat
                self.new_chat()

    # ---- layout ------------------------------------------------------------
    def _conversations(self) -> QWidget:
        w = QWidget()
        w.setObjectName("chatList")
        lay = QVBoxLayout(w)
        lay.setContentsMargins(14, 16, 8, 14)
        self.new_btn = QPushButton("+  New chat")
        self.new_btn.setObjectName("primary")
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search conversations")
        self.search.setClearButtonEnabled(True)
        self.list = QListWidget()
        row = QHBoxLayout()
        self.rename_btn = QPushButton("Rename")
        self.delete_btn = QPushButton("Delete")
        self.delete_btn.setObjectName("danger")
        row.addWidget(self.rename_btn)
        row.addWidget(self.delete_btn)
        lay.addWidget(self.new_btn)
        lay.addWidget(self.search)
        lay.addWidget(self.list, 1)
        lay.addLayout(row)
        self.new_btn.clicked.connect(self.new_chat)
        self.search.textChanged.connect(self.refresh_list)
        self.list.itemClicked.connect(lambda it: self.open_conversation(it.data(Qt.UserRole)))
        self.rename_btn.clicked.connect(self.rename)
        self.delete_btn.clicked.connect(self.delete)
        return w

    def _center(self) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        lay.setContentsMargins(12, 14, 12, 14)
        top = QHBoxLayout()
        self.title = QLabel("New chat")
        self.title.setObjectName("h1")
        # Labels whose text changes with every chat must not set the column's minimum width: a long
        # title widened it, the splitter resized all three panes and the whole window was repainted
        # (twice per answer). A long title is cut at the edge instead.
        self.title.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        top.addWidget(self.title, 1)
        self.model_hint = QLabel()
        self.model_hint.setObjectName("stat")
        top.addWidget(self.model_hint)
        # The loaded model's LoRA adapters (those in the models list made for it): switching puts the adapter on
        # the model already loaded, once, and the next answer runs with it; the base is never reloaded.
        self.adapter = QComboBox()
        self.adapter.setToolTip("LoRA adapter: the loaded model's fine-tunes (Models panel); switching keeps the "
                                "model loaded and applies from the next answer")
        self.adapter.setMinimumContentsLength(12)
        self.adapter.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.adapter.addItem("no adapter", None)
        self.adapter.activated.connect(self._adapter_chosen)
        top.addWidget(self.adapter)
        lay.addLayout(top)
        self.system = QLineEdit()
        self.system.setPlaceholderText("System prompt (optional): how the assistant should behave")
        lay.addWidget(self.system)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        inner = QWidget()
        self.column = QVBoxLayout(inner)
        self.column.setContentsMargins(4, 8, 12, 8)
        self.column.setSpacing(10)
        self.empty = QLabel("Say hello to the model. Answers stream in token by token; "
                            "switch an answer to ▦ tokens and click one to see how it was chosen.")
        self.empty.setObjectName("muted")
        self.empty.setWordWrap(True)
        self.empty.setAlignment(Qt.AlignCenter)
        self.column.addWidget(self.empty)
        self.column.addStretch(1)
        self.scroll.setWidget(inner)
        self.scroll.verticalScrollBar().rangeChanged.connect(self._stick_to_bottom)
        lay.addWidget(self.scroll, 1)
        self.consent = Consent(self)
        self.consent_bar = ConsentBar(self.consent)
        lay.addWidget(self.consent_bar)
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Message the model — Ctrl+Enter to send")
        self.input.setFixedHeight(78)
        lay.addWidget(self.input)
        row = QHBoxLayout()
        self.status = QLabel()
        self.status.setObjectName("stat")
        self.status.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        row.addWidget(self.status, 1)
        self.regen_btn = QPushButton("↻ Regenerate")
        self.stop_btn = QPushButton("■ Stop")
        self.send_btn = QPushButton("Send")
        self.send_btn.setObjectName("primary")
        for b in (self.regen_btn, self.stop_btn, self.send_btn):
            row.addWidget(b)
        lay.addLayout(row)
        self.send_btn.clicked.connect(lambda: self.send(self.input.toPlainText()))
        self.stop_btn.clicked.connect(self.stop)
        self.regen_btn.clicked.connect(self.regenerate)
        self.system.editingFinished.connect(self._system_changed)
        self.input.installEventFilter(self)
        return w

    def _side(self) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        lay.setContentsMargins(8, 14, 14, 14)
        saved = self.ctx.setting("chat.params", None)
        self.params = ParamsView(saved if isinstance(saved, dict) else None)
        self.explain = ExplainView()
        lay.addWidget(self.explain)
        lay.addWidget(self.params)
        lay.addStretch(1)
        scroll = QScrollArea()    # the explanation's table can be taller than the window
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(w)
        scroll.setMinimumWidth(290)
        return scroll

    def eventFilter(self, obj, ev):
        from PySide6.QtCore import QEvent
        if obj is self.input and ev.type() == QEvent.KeyPress and ev.key() in (Qt.Key_Return, Qt.Key_Enter) \
                and ev.modifiers() & Qt.ControlModifier:
            self.send(self.input.toPlainText())
            return True
        return False

    # ---- state -------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.worker is None

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def _buttons(self):
        has_model = self.ctx.loaded is not None
        self.adapter.setEnabled(has_model and not self.busy and not self.ctx.adapter_busy)
        self.adapter.setVisible(has_model and self.adapter.count() > 1)
        self.send_btn.setEnabled(has_model and not self.busy)
        self.regen_btn.setEnabled(has_model and not self.busy and any(
            isinstance(b, AnswerBubble) for b in self.bubbles))
        self.stop_btn.setEnabled(self.busy)

    def _on_model(self, loaded):
        if self.busy:
            self.stop()
        self.session = None      # a new model answers the next message of the same conversation
        self._hint()
        self.adapter.clear()
        self.adapter.addItem("no adapter", None)
        if loaded is not None:
            self.refresh_adapters()
        self.params.model_defaults(getattr(loaded, "sampling", None))
        if loaded is not None:
            import sol.core.chat.session  # noqa: F401  now, not at the first message: ~20 ms of GUI thread
        self._buttons()

    # ---- LoRA adapters ---------------------------------------------------------
    def _hint(self):
        loaded = self.ctx.loaded
        adapter = f" + adapter {self.ctx.active_adapter}" if loaded is not None and self.ctx.active_adapter else ""
        self.model_hint.setText(f"model: {loaded.name}{adapter}" if loaded else "no model loaded — open Models")

    def refresh_adapters(self):
        """List the loaded model's adapters (the models list's LoRA entries whose base is this model)."""
        loaded = self.ctx.loaded
        if loaded is None:
            return
        from sol.core.formats.registry import list_models
        # Bound methods, not lambdas: a panel closed meanwhile is disconnected, not painted after its deletion.
        self.ctx.run(lambda: (list_models(), loaded), on_done=self._fill_adapters, on_error=self._adapters_failed)

    def _adapters_failed(self, e):
        self.ctx.status_message.emit(f"adapters: {e}")

    def _fill_adapters(self, result):
        models, lm = result
        if lm is not self.ctx.loaded:     # another model was loaded meanwhile
            return
        self.adapter.blockSignals(True)
        self.adapter.clear()
        self.adapter.addItem("no adapter", None)
        for a in adapters_for(models, str(lm.path), lm.name):
            self.adapter.addItem(f"adapter: {a['name']}", a["path"])
            self.adapter.setItemData(self.adapter.count() - 1, a["path"], Qt.ToolTipRole)
        self._show_active()
        self.adapter.blockSignals(False)
        self._buttons()

    def _show_active(self):
        active = self.ctx.active_adapter
        for i in range(self.adapter.count()):
            path = self.adapter.itemData(i)
            if (path is None and active is None) or (path is not None and active is not None
                                                     and self.ctx.adapter_name(path) == active):
                self.adapter.setCurrentIndex(i)
                return

    def _adapter_chosen(self, index: int):
        """The user picked an adapter (or none): put it on the loaded model between answers."""
        if self.busy:       # the selector is disabled while answering; a queued click waits its turn anyway
            self._show_active()
            return
        self.select_adapter(self.adapter.itemData(index))

    def select_adapter(self, folder: str | None):
        self.ctx.use_adapter(folder)
        self._buttons()

    def _on_adapter_loading(self, folder: str):
        self.status.setText(f"putting the adapter {folder} on the model …")
        self._buttons()

    def _on_adapter(self, name):
        self.session = None     # the cached prefix was computed without it: the next answer starts afresh
        self.adapter.blockSignals(True)
        self._show_active()
        self.adapter.blockSignals(False)
        self._hint()
        self.status.setText(f"adapter {name} on" if name else "no adapter: the base model answers")
        self._buttons()

    def _on_adapter_failed(self, message: str):
        self._append(Notice(f"error: {message}", error=True))
        self.status.setText("")
        self.adapter.blockSignals(True)
        self._show_active()
        self.adapter.blockSignals(False)
        self._buttons()

    def _session(self):
        if self.session is None:
            from sol.core.chat.session import ChatSession
            self.session = ChatSession(self.ctx.loaded, plugins=self.ctx.plugins, store=self.ctx.store,
                                       conversation_id=self.conversation_id, system=self.system.text() or None,
                                       consent=self.consent)
            self.ctx.set_chat_session(self.session)
        return self.session

    # ---- conversations -----------------------------------------------------
    def refresh_list(self, *_):
        self.list.clear()
        store = self.ctx.store
        if store is None:
            return
        for c in store.list_conversations(self.search.text() or None):
            item = QListWidgetItem(c["title"])
            item.setData(Qt.UserRole, c["id"])
            item.setToolTip(f"{c.get('messages', 0)} messages · {c.get('model') or ''}")
            self.list.addItem(item)
            if c["id"] == self.conversation_id:
                item.setSelected(True)

    def new_chat(self):
        if self.busy:
            return
        self.conversation_id = None
        self.session = None
        self.ctx.set_setting("chat.last_conversation", None)
        self.title.setText("New chat")
        self.system.clear()
        self._clear()
        self.list.clearSelection()
        self._buttons()

    def open_conversation(self, cid: int):
        if self.busy or cid is None:
            return
        store = self.ctx.store
        conv = store.conversation(cid)
        self.conversation_id = cid
        self.session = None
        self.title.setText(conv["title"])
        self.system.setText(conv.get("system") or "")
        self._show_messages(store.messages(cid))
        self.ctx.set_setting("chat.last_conversation", cid)
        for i in range(self.list.count()):
            self.list.item(i).setSelected(self.list.item(i).data(Qt.UserRole) == cid)
        self._buttons()

    def _show_messages(self, messages: list[dict]):
        self._clear()
        for m in messages:
            if m["role"] == "user":
                self._add_user(m["content"], m["id"])
            elif m["role"] == "assistant":
                b = self._add_answer(m["content"], m["id"])
                b.set_tokens(self.ctx.store.tokens(m["id"]))
                b.finish({"id": m["id"], "content": m["content"], "completion_tokens": m["completion_tokens"],
                          "prompt_tokens": m["prompt_tokens"]})
            elif m["role"] == "tool":
                self._add_card("tool", "").set_result({"result": m["content"]})
        self._update_branches()

    def rename(self):
        it = self.list.currentItem()
        if it is None or self.ctx.store is None:
            return
        title, ok = QInputDialog.getText(self, "Rename conversation", "Title", text=it.text())
        if ok and title.strip():
            self.ctx.store.rename_conversation(it.data(Qt.UserRole), title.strip())
            if it.data(Qt.UserRole) == self.conversation_id:
                self.title.setText(title.strip())
            self.refresh_list()

    def delete(self, confirm: bool = True):
        it = self.list.currentItem()
        if it is None or self.ctx.store is None:
            return
        if confirm and QMessageBox.question(self, "Delete conversation",
                                            f"Delete “{it.text()}” and all its messages? This cannot be undone."
                                            ) != QMessageBox.Yes:
            return
        cid = it.data(Qt.UserRole)
        self.ctx.store.delete_conversation(cid)
        if cid == self.conversation_id:
            self.new_chat()
        self.refresh_list()

    def _system_changed(self):
        if self.session is not None:
            self.session.system = self.system.text() or None

    # ---- the column of messages ----------------------------------------------
    def _drop(self, w: QWidget):
        # Out of the layout now; deleteLater alone would leave it painted until the loop gets to it.
        self.column.removeWidget(w)
        w.hide()
        if not self._keep(w):
            w.deleteLater()

    def _keep(self, w: QWidget) -> bool:
        """Keep a bubble or card, hidden, for a later message: building one was the GUI's longest stall."""
        spare = self.spare.setdefault(type(w), [])
        if not isinstance(w, (UserBubble, AnswerBubble, ToolCard)) or len(spare) >= SPARE:
            return False
        if w.parentWidget() is not self.column.parentWidget():   # a new one; a dropped one is there
            w.setParent(self.column.parentWidget())
        w.hide()
        spare.append(w)
        return True

    def _reuse(self, cls, *args) -> QWidget | None:
        """A kept widget of this class showing *args, or None (the caller builds one)."""
        spare = self.spare.get(cls)
        if not spare:
            return None
        w = spare.pop()
        w.reset(*args)
        return w

    def _clear(self):
        for b in self.bubbles:
            self._drop(b)
        self.bubbles = []
        self.answer = None
        self.empty.show()

    def _append(self, w: QWidget):
        self.empty.hide()
        self.column.insertWidget(self.column.count() - 1, w)
        if w.isHidden():
            w.show()              # a reused one was hidden when dropped
        self.bubbles.append(w)

    def _truncate_from(self, w: QWidget):
        i = self.bubbles.index(w)
        for b in self.bubbles[i:]:
            self._drop(b)
        self.bubbles = self.bubbles[:i]

    def _new_user(self, text="", mid=None) -> UserBubble:
        b = UserBubble(text, mid)     # connected once; the connections stay when it is reused
        b.edit_submitted.connect(self.edit)
        b.branch_prev.clicked.connect(lambda: self._switch(b, -1))
        b.branch_next.clicked.connect(lambda: self._switch(b, +1))
        return b

    def _new_answer(self, text="", mid=None) -> AnswerBubble:
        b = AnswerBubble(text, mid)
        b.token_clicked.connect(self._explain)
        b.branch_prev.clicked.connect(lambda: self._switch(b, -1))
        b.branch_next.clicked.connect(lambda: self._switch(b, +1))
        return b

    def _add_user(self, text, mid=None) -> UserBubble:
        b = self._reuse(UserBubble, text, mid) or self._new_user(text, mid)
        self._append(b)
        return b

    def _add_answer(self, text="", mid=None) -> AnswerBubble:
        b = self._reuse(AnswerBubble, text, mid) or self._new_answer(text, mid)
        self._append(b)
        return b

    def _add_card(self, name, arguments) -> ToolCard:
        card = self._reuse(ToolCard, name, arguments) or ToolCard(name, arguments)
        self._append(card)
        return card

    def _stick_to_bottom(self, _lo, hi):
        if self.busy:
            self.scroll.verticalScrollBar().setValue(hi)

    def _update_branches(self):
        store = self.ctx.store
        if store is None:
            return
        for b in self.bubbles:
            if isinstance(b, Bubble) and b.message_id is not None:
                sibs = [m["id"] for m in store.siblings(b.message_id) if m["role"] == b.role]
                if b.message_id in sibs:
                    b.set_branches(sibs.index(b.message_id), len(sibs))

    def _switch(self, bubble: Bubble, step: int):
        if self.busy or bubble.message_id is None:
            return
        sibs = [m["id"] for m in self.ctx.store.siblings(bubble.message_id) if m["role"] == bubble.role]
        i = sibs.index(bubble.message_id) + step
        if 0 <= i < len(sibs):
            messages = self.ctx.store.switch_branch(sibs[i])
            if self.session is not None:
                self.session.messages = messages
            self._show_messages(messages)

    # ---- generating --------------------------------------------------------
    def send(self, text: str):
        text = text.strip()
        if not text or self.busy or self.ctx.loaded is None:
            return
        self.input.clear()
        s = self._session()
        self._start(lambda cancel, p=self.params.generation_params(): s.send(text, p, cancel))

    def regenerate(self):
        if self.busy or self.ctx.loaded is None:
            return
        last_user = max((i for i, b in enumerate(self.bubbles) if isinstance(b, UserBubble)), default=None)
        if last_user is None:
            return
        s = self._session()
        if last_user + 1 < len(self.bubbles):
            self._truncate_from(self.bubbles[last_user + 1])
        self._start(lambda cancel, p=self.params.generation_params(): s.regenerate(p, cancel))

    def edit(self, message_id: int, text: str):
        if self.busy or self.ctx.loaded is None:
            return
        s = self._session()
        b = next((b for b in self.bubbles if isinstance(b, UserBubble) and b.message_id == message_id), None)
        if b is not None:
            self._truncate_from(b)
        self._start(lambda cancel, p=self.params.generation_params(): s.edit(message_id, text, p, cancel))

    def stop(self):
        if self.worker is not None:
            self.worker.stop()
            self.status.setText("stopping …")

    def _start(self, make_iter):
        self.ctx.set_setting("chat.params", self.params.values())
        self.answer = None
        self.cards = []
        self.status.setText("generating …")
        self.worker = self.ctx.stream(make_iter, self._on_event, self._on_finished, self._on_error,
                                      may_wait=lambda ev: isinstance(ev, dict) and ev.get("type") == "token")
        self.consent.cancel = self.worker.cancel   # Stop while a tool waits for consent answers Deny
        self._flush.start()
        self._buttons()

    def _on_event(self, ev: dict):
        self.ctx.chat_event.emit(ev)
        t = ev.get("type")
        if t == "token":
            if self.answer is None:
                self.answer = self._add_answer()
                self.answer.streaming = True
            self.answer.add_token(ev)
            self._dirty = True
        elif t == "message":
            self._on_message(ev)
        elif t == "tool_call":
            self.cards.append(self._add_card(ev.get("name", "?"), ev.get("arguments")))
        elif t == "tool_result":
            if self.cards:
                self.cards[-1].set_result(ev)
        elif t == "notice":
            self._append(Notice(ev.get("text", "")))
        elif t == "error":
            self._append(Notice(ev.get("message", "error"), error=True))

    def _on_message(self, ev: dict):
        role = ev.get("role")
        if role == "user":
            self._add_user(ev.get("content", ""), ev.get("id"))
            if self.conversation_id is None and self.session is not None:
                self.conversation_id = self.session.conversation_id
                self.ctx.set_setting("chat.last_conversation", self.conversation_id)
                self.title.setText((ev.get("content", "").splitlines() or ["New chat"])[0][:60])
        elif role == "assistant":
            if self.answer is None:
                self.answer = self._add_answer()
            self.answer.finish(ev)
            self.ctx.last_answer = ev.get("content", "")
            self.answer = None        # the next segment (after a tool round) is a new answer
        self._dirty = False

    def _paint(self):
        if self._dirty and self.answer is not None:
            self.answer.render()
        self._dirty = False

    def _on_error(self, e):
        self._append(Notice(f"error: {e}", error=True))

    def _on_finished(self):
        self._flush.stop()
        self.consent_bar.hide()
        stopped = self.worker is not None and self.worker.cancel.is_set()
        self.worker = None
        if self.answer is not None:      # cut off before its message event (stop, error)
            self.answer.streaming = False
            self.answer.render()
            self.answer.stats.setText(f"{len(self.answer.tokens)} tokens · stopped")
            self.answer = None
        self.status.setText("stopped" if stopped else "")
        self._update_branches()
        self.refresh_list()
        self._buttons()

    def _explain(self, ev: dict):
        tok = self.ctx.tokenizer
        self.explain.show_token(ev, (lambda i: tok.decode([i])) if tok else str)

    def shutdown(self):
        if self.worker is not None:
            self.worker.stop()
            self.worker.thread.wait(3000)
