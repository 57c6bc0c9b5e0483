"""`sol train STAGE ...`: the four stages (and any a plugin adds), and `sol train recipe starter`.

With `--events -` the run speaks JSON lines on stdout (what the GUI reads);
otherwise a progress bar on stderr. Errors are also sent as an `error` event
before the usual `error: ...` line and exit status 1.
"""
from __future__ import annotations


HELP = "train a model: pretrain, sft, reward, rl, or a whole recipe"


def register_brief(sub) -> None:
    """`train` in the list of commands (`sol --help`). Its stages' flags come from each stage's module,
    which imports torch, so they are built only when the command is `sol train ...` (register)."""
    sub.add_parser("train", help=HELP)


def register(sub) -> None:
    from ..train.recipe import add_arguments as add_recipe_arguments
    from ..train.stages import all_stages
    p = sub.add_parser("train", help=HELP)
    stages = p.add_subparsers(dest="stage", metavar="STAGE")
    for spec in all_stages():
        builtin = not spec.plugin or spec.plugin == "sol"
        # A plugin's stage gets the flags every stage shares (--out, --events, --max-steps, ...) first;
        # a flag it defines itself replaces the shared one of that name.
        sp = stages.add_parser(spec.name, help=spec.description, description=spec.description,
                               conflict_handler="error" if builtin else "resolve")
        if builtin:
            spec.add_arguments(sp)
        else:
            from ..train.options import add_common
            add_common(sp)
            try:
                spec.add_arguments(sp)
            except Exception as e:   # a plugin's broken flags cost its own stage, never `sol train`
                stages._name_parser_map.pop(spec.name, None)
                _skip_stage(stages, spec, e)
                continue
        sp.set_defaults(func=_runner(spec))
    rp = stages.add_parser("recipe", help="run a whole recipe (starter: all four stages; words: a BPE model for the embedding explorer)")
    add_recipe_arguments(rp)
    rp.set_defaults(func=_recipe)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _skip_stage(stages, spec, e) -> None:
    import sys
    stages._choices_actions[:] = [a for a in stages._choices_actions if a.dest != spec.name]
    sys.stderr.write(f"warning: training stage {spec.name!r} of plugin {spec.plugin} skipped: its "
                     f"add_arguments raised {type(e).__name__}: {e}\n")


def _with_events(args, body):
    import os

    from ..errors import SolError
    from ..train.events import make_emitter
    from ..train.loop import mark_command_start
    mark_command_start()   # the start event's startup_s counts from this process's start
    emit = make_emitter(getattr(args, "events", None), int(os.environ.get("RANK", "0")))
    try:
        body(emit)
    except SolError as e:
        emit({"type": "error", "message": str(e)})
        raise
    except Exception as e:
        emit({"type": "error", "message": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"})
        raise
    finally:
        close = getattr(emit, "close", None)
        if close:
            close()
    return 0


def _runner(spec):
    return lambda args: _with_events(args, lambda emit: spec.run(args, emit))


def _recipe(args) -> int:
    from ..train.recipe import run
    return _with_events(args, lambda emit: run(args, emit))
