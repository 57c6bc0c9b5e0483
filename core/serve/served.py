"""What `sol serve` serves: each loaded model with its engine, and the state every route shares.

The routes are plain functions in their own modules; what they share (the models, the request
log, the plugin tools, the engine requests in flight) lives on one ServeState in `app.state.serve`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fastapi import Request

from ..errors import SolError
from ..generation.engine import end_of_turn_ids, stop_ids_for
from . import protocol as P
from .constrain import ll_tokenizer
from .tools import ServerTools, hidden_specials, trained_tools


@dataclass
class Served:
    """One loaded model and the engine that serves it."""
    name: str
    lm: object                      # checkpoint.LoadedModel
    engine: object                  # BatchEngine
    adapter: str | None = None      # the LoRA adapter this model id runs (its base's engine and weights)
    _texts: dict = field(default_factory=dict)
    _ll: object = None
    _ll_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        # The plugin tools the model was trained to call (its sol.json), and the markup never shown as content.
        folder = getattr(self.lm, "path", None)
        self.trained_tools = trained_tools(getattr(self.lm, "meta", None),
                                           str(folder / "sol.json") if folder is not None else "sol.json")
        self.hidden = hidden_specials(self.tokenizer)
        extra = getattr(self.lm.config, "extra", None)
        self.end_ids = end_of_turn_ids(self.lm.tokenizer, extra)
        self.stop_ids = stop_ids_for(self.lm.tokenizer, extra)
        defaults = getattr(self.lm, "sampling", None)
        if defaults:   # what requests that leave a field out get: refuse a bad one at start-up, by its file
            try:
                P.SamplingParams(**defaults).validate()
            except SolError as e:
                raise SolError(f"{self.lm.path / 'generation_config.json'}: {e}") from None

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def context(self) -> int:
        return self.lm.config.context

    def token_text(self, i: int) -> str:
        t = self._texts.get(i)
        if t is None:
            t = self._texts[i] = self.tokenizer.decode([i])
        return t

    def ll_tokenizer(self):
        with self._ll_lock:   # built once (up to a second for a large vocabulary)
            if self._ll is None:
                self._ll = ll_tokenizer(self.tokenizer, self.lm.config.vocab_size)
            return self._ll


class ServeState:
    """What every route shares, kept on `app.state.serve`."""

    def __init__(self, app_state, served: list[Served], log=None, plugins=None, plugin_tools: str = "trained"):
        self.app_state = app_state
        self.served = served
        self.models = {s.name: s for s in served}
        self.log = log or (lambda entry: None)
        self.tools = ServerTools(plugins, plugin_tools)   # which plugin tools the server runs for a model
        self.inflight: set = set()  # engine requests still running, cancelled when the server stops

    def engines(self) -> list:
        """Each engine once (a base and its adapters share one)."""
        return list({id(s.engine): s.engine for s in self.served}.values())

    @property
    def closing(self) -> bool:
        # On `app.state` itself: that is where `sol serve` sets it on SIGINT/SIGTERM.
        return self.app_state.closing

    def pick(self, body: dict) -> Served:
        """The model a request names; with one model served, a request may leave it out."""
        name = body.get("model")
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise P.ApiError(404, f"model {name!r} is not served here; served: {', '.join(self.models)}", "model",
                             "model_not_found", "not_found_error")
        return self.models[name]


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve
