"""`sol serve`: the OpenAI API on this machine, over the models given with --model.

Prints `listening on http://HOST:PORT` once the socket accepts connections (port 0 picks a free
one, and the line says which), one line per finished request, and serves until SIGINT or SIGTERM;
then it stops accepting, cancels what is still generating, and exits 0 within a few seconds.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve models over the OpenAI API (chat, completions, embeddings)")
    p.add_argument("--model", action="append", required=True,
                   help="model directory or name from `sol models list` (repeatable)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also serve a LoRA adapter as model id NAME, on the --model whose weights it fits (one "
                        "copy of the base serves it and its adapters; repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set SOL_API_KEY)")
    p.add_argument("--max-concurrent", type=int, default=8, help="requests decoded at once per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 503")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16 (default auto)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser pages from this origin "
                   "(repeatable; * for any)")
    p.add_argument("--log-json", action="store_true", help="request log lines as JSON objects")
    p.add_argument("--plugin-tools", nargs="?", const="all", default="trained", choices=("trained", "all", "none"),
                   help="for requests that bring no tools of their own, run plugin tools here as the chat does: "
                        "trained (default) the ones the model's sol.json names, all (the bare flag) every plugin "
                        "tool, none no tool (a call comes back as tool_calls)")
    p.add_argument("--no-plugin-tools", dest="plugin_tools", action="store_const", const="none",
                   help="the same as --plugin-tools none")
    p.add_argument("--prefix-cache-mb", type=float, default=512,
                   help="memory for the KV rows of recent prompts, reused by requests that begin the same way "
                        "(default 512; 0 turns the prefix cache off)")
    p.set_defaults(func=run)


def model_name(path: Path) -> str:
    """The name `sol models list` shows for this directory, else the directory's own name."""
    from ..formats.registry import list_models
    for m in list_models():
        if Path(m["path"]).resolve() == path.resolve():
            return m["name"]
    return path.name


def load_all(args) -> list:
    from ..devices import pick_device, pick_dtype
    from ..errors import SolError
    from ..formats.checkpoint import load_model
    from ..formats.registry import resolve
    from ..generation.batch import BatchEngine
    from ..generation.engine import warm_up
    from ..generation.prefix_cache import PrefixCache
    from ..serve.served import Served
    from .common import quantize_arg
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.prefix_cache_mb < 0:
        raise SolError(f"--prefix-cache-mb {args.prefix_cache_mb:g}: must be 0 (off) or more")
    prefix = PrefixCache(int(args.prefix_cache_mb * 2**20))   # one budget for every served model
    bases: list[tuple[str, object]] = []
    for name in args.model:
        path = resolve(name)
        lm = load_model(path, device=device, dtype=dtype, quantize=quantize_arg(args))
        label = model_name(path)
        if any(label == b for b, _ in bases):
            raise SolError(f"--model {name}: {label} is already served; give each model once")
        bases.append((label, lm))
    adapters = attach_adapters(args.adapter, bases)   # before the engines: they see the adapters a model has
    served = []
    for label, lm in bases:
        warm_up(lm.model)   # before the port opens: the first request is then as quick as the next
        engine = BatchEngine(lm.model, lm.tokenizer, max_batch=args.max_concurrent, max_queue=args.max_queue,
                             prefix_cache=prefix, cache_key=label)
        served.append(Served(label, lm, engine))
        served += [Served(name, lm, engine, adapter=name) for name, on in adapters if on is lm]
    return served


def attach_adapters(specs: list[str], bases: list) -> list[tuple[str, object]]:
    """Each --adapter NAME=DIR put on the one served model whose weights it fits: [(NAME, its LoadedModel)]."""
    from ..errors import SolError
    from ..formats.adapter import load_adapter, read_adapter
    out: list[tuple[str, object]] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise SolError(f"--adapter {spec}: give NAME=DIR, e.g. --adapter calc=./my-adapter")
        if name in [b for b, _ in bases] + [n for n, _ in out]:
            raise SolError(f"--adapter {spec}: the model id {name!r} is already served; choose another NAME")
        fits, why = [], []
        for label, lm in bases:
            try:
                read_adapter(lm, folder, check_name=False)
                fits.append((label, lm))
            except SolError as e:
                why.append(f"{label}: {e}")
        if not fits:
            raise SolError(f"--adapter {spec}: fits none of the served models ({'; '.join(why)})")
        if len(fits) > 1:
            raise SolError(f"--adapter {spec}: fits several served models ({', '.join(b for b, _ in fits)}); serve "
                           "it with one of them only")
        load_adapter(fits[0][1], folder, name=name, check_name=False)
        out.append((name, fits[0][1]))
    return out


def bind(host: str, port: int) -> socket.socket:
    from ..errors import SolError
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it a keep-alive client waits ~40 ms on every
    # response (Nagle's algorithm holds the body until the headers' delayed ACK).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SolError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                       "choose another port, or 0 for any free one") from None
    sock.listen(128)
    return sock


def run(args) -> int:
    import uvicorn

    from ..errors import SolError
    from ..serve.app import create_app
    from ..serve.log import print_log
    if args.max_concurrent < 1:
        raise SolError(f"--max-concurrent {args.max_concurrent}: must be at least 1")
    if not 0 <= args.port <= 65535:
        raise SolError(f"--port {args.port}: must be from 0 to 65535")
    key = args.api_key or os.environ.get("SOL_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        sys.stderr.write(f"warning: --host {args.host} lets other machines use these models with no API key; "
                         "set --api-key or SOL_API_KEY\n")
    served = load_all(args)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    from ..plugins.manager import PluginManager
    # With none, only Sol's built-in plugins are read, for their schemas: a call comes back named as they name it.
    plugins = PluginManager(safe_mode=True) if args.plugin_tools == "none" else PluginManager()
    plugins.load()
    for info in plugins.plugins():
        if info.status != "ok":
            sys.stderr.write(f"warning: plugin {info.name} is broken and skipped: {info.error}\n")
    app = create_app(served, key, args.cors_origin, print_log(args.log_json), plugins, args.plugin_tools)
    for s in served:
        if s.adapter is None:
            sys.stderr.write(f"{s.name}: {s.engine.describe()}\n")   # the memory N concurrent sequences take
            s.engine.start()
        else:
            sys.stderr.write(f"{s.name}: LoRA adapter {s.adapter} on {s.lm.path.name}, served by its engine\n")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Stop accepting, and end what is still generating now rather than after it finishes.
            app.state.closing = True
            app.state.cancel_inflight()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, lifespan="off",
                            access_log=False)
    server = Server(config)
    announce = f"listening on http://{host if ':' not in host else f'[{host}]'}:{port}"
    # uvicorn re-raises the signal it caught once it has shut down; ours makes that a no-op, so
    # the process exits 0 after a clean stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    orig_startup = server.startup

    async def startup(sockets=None):
        await orig_startup(sockets)
        sys.stdout.write(announce + "\n")
        sys.stdout.flush()
    server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        for engine in {id(s.engine): s.engine for s in served}.values():
            engine.close(timeout=2.0)
    if args.log_json:
        print_json({"stopped": True})
    else:
        sys.stdout.write("stopped\n")
    return 0
