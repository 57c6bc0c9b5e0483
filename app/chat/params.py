"""The sampling controls beside the chat: temperature, top-k, top-p, min-p, repetition penalty,
max tokens, seed. Remembered in the store's settings.

A sampling control the user has not changed takes the loaded model's default from its
generation_config.json (Sol's DEFAULTS when it has none); one the user changed stays theirs until
"Model defaults" gives them back."""
from __future__ import annotations

from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QFrame, QLabel, QPushButton, QSpinBox, QVBoxLayout

DEFAULTS = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "min_p": 0.0, "repetition_penalty": 1.1,
            "max_tokens": 256, "seed": -1}
MODEL_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")   # what a model may suggest


class ParamsView(QFrame):
    def __init__(self, saved: dict | None = None):
        super().__init__()
        self.setObjectName("card")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 10, 12, 10)
        head = QLabel("Sampling")
        head.setObjectName("h2")
        lay.addWidget(head)
        form = QFormLayout()
        form.setVerticalSpacing(3)
        saved = saved or {}
        v = {**DEFAULTS, **saved}
        # Settings saved before "user_set" existed: a value other than the default was the user's.
        self.user_set = set(saved["user_set"]) if isinstance(saved.get("user_set"), list) else \
            {k for k in MODEL_FIELDS if k in saved and saved[k] != DEFAULTS[k]}
        self._model: dict = {}
        self._applying = False
        self.temperature = self._dbl(0, 5, 0.05, v["temperature"], "0 = greedy")
        self.top_k = self._int(0, 100_000, v["top_k"], "0 = off")
        self.top_p = self._dbl(0.01, 1, 0.01, v["top_p"], "1 = off")
        self.min_p = self._dbl(0, 0.99, 0.01, v["min_p"], "0 = off")
        self.rep = self._dbl(0.5, 3, 0.05, v["repetition_penalty"], "1 = off")
        self.max_tokens = self._int(1, 32768, v["max_tokens"], "")
        self.seed = self._int(-1, 2**31 - 1, v["seed"], "")
        self.seed.setSpecialValueText("random")
        for label, w in (("Temperature", self.temperature), ("Top-k", self.top_k), ("Top-p", self.top_p),
                         ("Min-p", self.min_p), ("Repetition penalty", self.rep), ("Max tokens", self.max_tokens),
                         ("Seed", self.seed)):
            form.addRow(label, w)
        lay.addLayout(form)
        for name in MODEL_FIELDS:
            self._widget(name).valueChanged.connect(lambda _v, n=name: self._touched(n))
        self.source = QLabel("")
        self.source.setObjectName("muted")
        self.source.setWordWrap(True)
        self.reset = QPushButton("Model defaults")
        self.reset.setToolTip("give the sampling controls back to the model's generation_config.json (or Sol's)")
        self.reset.clicked.connect(self.reset_to_model)
        lay.addWidget(self.source)
        lay.addWidget(self.reset)

    def _widget(self, name: str):
        return self.rep if name == "repetition_penalty" else getattr(self, name)

    def _touched(self, name: str) -> None:
        if not self._applying:
            self.user_set.add(name)

    def model_defaults(self, sampling: dict | None) -> None:
        """A model was loaded: controls the user has not set take its defaults (generation_config.json)."""
        self._model = dict(sampling or {})
        self._applying = True
        try:
            for name in MODEL_FIELDS:
                if name not in self.user_set:
                    self._widget(name).setValue(self._model.get(name, DEFAULTS[name]))
        finally:
            self._applying = False
        used = [k for k in MODEL_FIELDS if k in self._model and k not in self.user_set]
        self.source.setText("from the model's generation_config.json: " + ", ".join(used) if used else "")

    def reset_to_model(self) -> None:
        self.user_set.clear()
        self.model_defaults(self._model)

    def _dbl(self, lo, hi, step, v, tip):
        s = QDoubleSpinBox()
        s.setRange(lo, hi)
        s.setSingleStep(step)
        s.setDecimals(2)
        s.setValue(v)
        s.setToolTip(tip)
        return s

    def _int(self, lo, hi, v, tip):
        s = QSpinBox()
        s.setRange(lo, hi)
        s.setValue(v)
        s.setToolTip(tip)
        return s

    def values(self) -> dict:
        return {"temperature": self.temperature.value(), "top_k": self.top_k.value(), "top_p": self.top_p.value(),
                "min_p": self.min_p.value(), "repetition_penalty": self.rep.value(),
                "max_tokens": self.max_tokens.value(), "seed": self.seed.value(), "user_set": sorted(self.user_set)}

    def generation_params(self):
        from sol.core.generation.engine import GenerationParams
        from sol.core.generation.sampling import SamplingParams
        v = self.values()
        sp = SamplingParams(temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"], min_p=v["min_p"],
                            repetition_penalty=v["repetition_penalty"], seed=None if v["seed"] < 0 else v["seed"])
        return GenerationParams(max_tokens=v["max_tokens"], sampling=sp)
