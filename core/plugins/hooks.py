"""Plugin hook specifications (pluggy, project name "sol").

A plugin is a module (or a distribution registering one under the entry-point
group `sol.plugins`) that implements any of these hooks with `@hookimpl`:

    from sol.core.plugins.hooks import hookimpl, ToolSpec

    @hookimpl
    def sol_tools():
        return [ToolSpec(name="echo", description="Repeat a text.",
                         parameters={"type": "object", "properties": {"text": {"type": "string"}},
                                     "required": ["text"]},
                         func=lambda args: args["text"])]

The plugin manager (core/plugins/manager.py) calls every hook of every plugin inside
its own try/except: a plugin that raises is marked broken and skipped, and
Sol carries on. See docs/plugins.md for a complete third-party plugin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

PROJECT = "sol"
ENTRY_POINT_GROUP = "sol.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass
class ToolSpec:
    """A tool the model may call in the chat."""
    name: str                              # how the model names it: "calculator"
    description: str                       # one sentence the model (and the user) reads
    parameters: dict                       # JSON schema of the arguments object
    func: Callable[[dict], Any]            # called with the arguments; returns a JSON-able result
    plugin: str = ""                       # filled in by the plugin manager


@dataclass
class PanelSpec:
    """A panel in the GUI's left navigation. `factory(context)` returns a QWidget; only the GUI calls it,
    so a plugin's core part stays importable without Qt (import Qt inside the factory)."""
    name: str                              # stable id: "tokens", "attention", "training", "plugins"
    title: str                             # shown in the navigation: "Tokens"
    factory: Callable[[Any], Any]          # (PanelContext) -> QWidget
    icon: str | None = None                # a file name under resources/icons, or None
    order: int = 100                       # position in the navigation, smaller first
    plugin: str = ""


@dataclass
class StageSpec:
    """A training stage. `run(args, emit)` trains; `add_arguments(parser)` adds its CLI flags."""
    name: str                              # "pretrain", "sft", "reward", "rl", or a plugin's own ("dpo")
    description: str
    add_arguments: Callable[[Any], None]   # (argparse parser) -> None
    run: Callable[..., Any]                # (args, emit) -> output model directory
    plugin: str = ""
    extra: dict = field(default_factory=dict)


class SolHookSpecs:
    @hookspec
    def sol_tools(self) -> list[ToolSpec]:
        """Tools for the chat loop. Return a list of ToolSpec. Called once when plugins load.
        `func(arguments)` gets the JSON object the model wrote and returns a JSON-able result (a string
        reaches the model as is); raising sends `error: <message>` back to the model instead."""

    @hookspec
    def sol_panels(self) -> list[PanelSpec]:
        """GUI panels. Return a list of PanelSpec; the factory is called by the GUI only, with a
        PanelContext holding what a panel may use (loaded model and tokenizer, chat session and
        its events, the store, a way to run work off the GUI thread)."""

    @hookspec
    def sol_chat_event(self, event: dict) -> None:
        """Observe the chat: called with every chat event (a dict with a "type" key: token, tool_call,
        tool_result, message, notice, error; see core/chat/session.py for their keys). Must return quickly: it
        runs on the generation thread. A plugin that raises here is marked broken and gets no more events."""

    @hookspec
    def sol_training_stages(self) -> list[StageSpec]:
        """Training stages. Return a list of StageSpec; the four built-in stages are registered this way."""

    @hookspec
    def sol_cli_commands(self, subparsers) -> None:
        """Add `sol` subcommands: call subparsers.add_parser(...) and set_defaults(func=...)."""
