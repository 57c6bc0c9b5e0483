"""`sol chat`: talk to a model in the terminal, tools included.

With --message it runs those turns and exits; with --json it prints one
event per line (token, tool_call, tool_result, message, notice, error).
Conversations are kept in the store, like the GUI's.
"""
from __future__ import annotations

import sys

from ..chat.markup import without_calls
from .common import add_model_args, load, print_json
from .plugins import add_safe_mode

CHAT_DEFAULTS = {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (tools included)")
    add_model_args(p, adapter=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--message", action="extend", nargs="+", default=[],
                   help="user message(s) to send in turn, then exit (repeatable); without it, chat interactively")
    p.add_argument("--conversation", type=int, default=None, help="continue a stored conversation by its id")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    # Unset sampling flags take the model's generation_config.json defaults, else CHAT_DEFAULTS.
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's, else 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="(default: the model's, else 0, off)")
    p.add_argument("--top-p", type=float, default=None, help="(default: the model's, else 1, off)")
    p.add_argument("--min-p", type=float, default=None, help="(default: the model's, else 0, off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="(default: the model's, else 1, off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--template-var", action="append", default=[], metavar="NAME=VALUE",
                   help="a variable for the chat template, e.g. enable_thinking=false for Qwen3 (repeatable; "
                        "the value is read as JSON when it is JSON: false, 3, \"text\")")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument("--yes", action="store_true", help="allow every tool call that needs consent (MCP tools "
                   "trusted `ask`) without asking; without a terminal to ask on, such calls are denied")
    add_safe_mode(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..chat.session import ChatSession
    from ..chat.store import Store
    from ..errors import SolError
    from ..generation.engine import GenerationParams
    from ..generation.sampling import SamplingParams
    from ..plugins.manager import PluginManager
    if args.max_tokens < 1:
        raise SolError(f"--max-tokens {args.max_tokens}: must be at least 1")
    tvars = template_vars(args.template_var)   # a bad flag fails before loading
    user = {k: getattr(args, k) for k in CHAT_DEFAULTS if getattr(args, k) is not None}
    SamplingParams(**{**CHAT_DEFAULTS, **user}, seed=args.seed).validate()   # a bad flag fails before loading
    lm = load(args)
    from ..generation.engine import warm_up
    warm_up(lm.model)   # while the prompt waits for the first message, not in its first answer's time
    model = {k: v for k, v in lm.sampling.items() if k not in user}
    if model and not args.json:
        sys.stderr.write("sampling: the model's defaults (generation_config.json) "
                         + ", ".join(f"{k} {v:g}" for k, v in model.items()) + "\n")
    sampling = SamplingParams(**{**CHAT_DEFAULTS, **model, **user}, seed=args.seed)
    try:
        sampling.validate()
    except SolError as e:
        raise SolError(f"{lm.path / 'generation_config.json'}: {e}") from None
    params = GenerationParams(max_tokens=args.max_tokens, sampling=sampling, explain=args.json)
    plugins = PluginManager(safe_mode=True if args.safe_mode else None)
    plugins.load()
    for info in plugins.plugins():
        if info.status != "ok" and not args.json:
            sys.stderr.write(f"warning: plugin {info.name} is broken and skipped: {info.error}\n")
    chat = ChatSession(lm, plugins, Store(), args.conversation, args.system, tvars, consent=consent(args.yes))
    if args.message:
        ok = True
        for text in args.message:
            ok = show(chat.send(text, params), args.json) and ok
        return 0 if ok else 1
    return interactive(chat, params, args.json)


def consent(yes: bool):
    """The chat's answer when a tool needs the user's yes: --yes allows; a terminal asks; else deny."""
    import json

    def ask(name: str, arguments: dict) -> str:
        if yes:
            return "allow"
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            sys.stderr.write(f"\nnote: {name} needs your consent and there is no terminal to ask on: denied "
                             "(--yes allows such calls)\n")
            return "deny"
        sys.stderr.write(f"\nThe model wants to call {name} {json.dumps(arguments, ensure_ascii=False)}\n")
        while True:
            try:
                answer = input("Allow? [y]es, [a]lways for this tool, [n]o: ").strip().lower()
            except EOFError:
                return "deny"
            if answer in ("y", "yes", "a", "always", "n", "no", ""):
                return {"y": "allow", "yes": "allow", "a": "always", "always": "always"}.get(answer, "deny")
    return ask


def show(events, as_json: bool) -> bool:
    """Print a turn's events; False if it ended in an error. The answer's text goes to stdout as the GUI
    shows it: a tool call and its result as one `[name -> result]` line on stderr, not as the model's markup
    (--json gives every token)."""
    ok = True
    segment, printed = "", 0   # this answer segment's text, and how much of what it shows is printed
    for ev in events:
        kind = ev["type"]
        ok = ok and kind != "error"
        if as_json:
            print_json(ev)
        elif kind == "token":
            if ev.get("forced"):   # a tool's result, fed to the model: printed as its [name -> result] line
                continue
            segment += ev["text"]
            shown = without_calls(segment, streaming=True)
            sys.stdout.write(shown[printed:])
            sys.stdout.flush()
            printed = len(shown)
        elif kind == "tool_result":
            out = ev.get("result") if "result" in ev else f"error: {ev.get('error')}"
            sys.stderr.write(f"[{ev['name']} -> {out}]\n")
        elif kind == "message" and ev["role"] == "assistant":
            shown = without_calls(segment)
            sys.stdout.write(shown[printed:] + ("\n" if shown else ""))
            segment, printed = "", 0
            sys.stderr.write(f"[{ev['prompt_tokens']} prompt tokens, {ev['completion_tokens']} completion "
                             f"tokens, {ev['tokens_per_s']:.1f} tokens/s]\n")
        elif kind == "notice":
            sys.stderr.write(f"\nnote: {ev['text']}\n")
        elif kind == "error":
            sys.stderr.write(f"\nerror: {ev['message']}\n")
    return ok


def interactive(chat, params, as_json: bool) -> int:
    sys.stderr.write("Type a message. /regenerate answers again, /system TEXT sets the system prompt, "
                     "/exit (or Ctrl-D) quits.\n")
    while True:
        try:
            text = input("you> ")
        except EOFError:
            sys.stderr.write("\n")
            return 0
        except UnicodeDecodeError:
            from ..errors import SolError
            raise SolError("standard input: a line is not valid UTF-8; type or pipe UTF-8 text") from None
        text = utf8_text(text, "standard input", as_json)
        if text.strip() in ("/exit", "/quit"):
            return 0
        if not text.strip():
            continue
        if text.strip() == "/regenerate":
            show(chat.regenerate(params), as_json)
        elif text.startswith("/system"):
            chat.system = text[len("/system"):].strip() or None
            sys.stderr.write(f"system prompt {'set' if chat.system else 'cleared'}\n")
        else:
            show(chat.send(text, params), as_json)


def utf8_text(text: str, where: str, as_json: bool) -> str:
    """A line as Python read it from standard input, where bytes that are not UTF-8 arrive as lone
    surrogates (surrogateescape): those bytes replaced by U+FFFD, and a note saying so. Passed on as they
    came, they failed deep in the chat as `unexpected UnicodeEncodeError`. (The command line's arguments
    are checked by core/cli.py before any command runs.)"""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:   # a surrogate that stands for no byte: replace it alone
        fixed = text.encode("utf-8", "replace").decode("utf-8")
    note = f"{where}: bytes that are not UTF-8 were replaced by \ufffd; type or pipe UTF-8 text"
    if as_json:
        print_json({"type": "notice", "text": note})
    else:
        sys.stderr.write(f"note: {note}\n")
    return fixed


# The chat session gives the template these itself.
TEMPLATE_OWN = {"messages", "tools", "documents", "add_generation_prompt"}


def template_vars(items: list[str]) -> dict:
    """--template-var NAME=VALUE flags as {name: value}; a value that is JSON (false, 3) is read as JSON."""
    import json

    from ..errors import SolError
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.isidentifier() or name in TEMPLATE_OWN:
            raise SolError(f"--template-var {item}: write NAME=VALUE with NAME a template variable "
                           "(not messages, tools, documents or add_generation_prompt), e.g. enable_thinking=false")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out
