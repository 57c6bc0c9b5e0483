"""`sol plugins`: list, install, uninstall, enable and disable plugins."""
from __future__ import annotations

import sys

from .common import print_json


def add_safe_mode(p) -> None:
    p.add_argument("--safe-mode", action="store_true", help="load no third-party plugin (also SOL_SAFE_MODE=1)")


def manager(args):
    from ..plugins.manager import PluginManager
    pm = PluginManager(safe_mode=True if getattr(args, "safe_mode", False) else None)
    pm.load()
    return pm


def register(sub) -> None:
    p = sub.add_parser("plugins", help="list, install, enable and disable plugins")
    psub = p.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    lp = psub.add_parser("list", help="every plugin: built-in and installed, with its status")
    lp.add_argument("--json", action="store_true")
    add_safe_mode(lp)
    lp.set_defaults(func=run_list)
    ip = psub.add_parser("install", help="pip install a plugin (a folder, a wheel or a name) into this Python")
    ip.add_argument("spec", help="a folder with a pyproject.toml, a .whl file, or a package name")
    ip.add_argument("--no-deps", action="store_true", help="pass --no-deps to pip")
    ip.add_argument("--no-build-isolation", action="store_true", help="pass --no-build-isolation to pip "
                    "(build with the setuptools already installed; works offline)")
    ip.add_argument("--upgrade", action="store_true", help="pass --upgrade to pip")
    add_safe_mode(ip)
    ip.set_defaults(func=run_install)
    up = psub.add_parser("uninstall", help="pip uninstall the distribution of a third-party plugin")
    up.add_argument("name")
    add_safe_mode(up)
    up.set_defaults(func=run_uninstall)
    for action in ("enable", "disable"):
        ap = psub.add_parser(action, help=f"{action} a plugin (remembered)")
        ap.add_argument("name")
        add_safe_mode(ap)
        ap.set_defaults(func=run_enable if action == "enable" else run_disable)


def run_list(args) -> int:
    infos = manager(args).plugins()
    if args.json:
        print_json([i.to_dict() for i in infos])
        return 0
    for i in infos:
        state = "enabled" if i.enabled else "disabled"
        kind = "built-in" if i.builtin else "installed"
        hooks = ", ".join(h.removeprefix("sol_") for h in i.hooks) or "-"
        line = f"{i.name:<24} {i.version:<10} {kind:<9} {state:<8} {i.status:<6} {hooks}"
        if i.error:
            line += f"  ({i.error})"
        sys.stdout.write(line + "\n")
    return 0


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_install(args) -> int:
    from ..errors import SolError
    from ..plugins.manager import dist_of_spec, normalize_dist
    pm = manager(args)
    before = {i.name: (i.version, i.dist) for i in pm.plugins()}
    spec = pip_spec(args.spec)
    dist = dist_of_spec(spec)
    if dist is not None and normalize_dist(dist) == "sol-lab":
        raise SolError(f"{args.spec}: that is Sol itself, not a plugin; to update Sol, run "
                       "`pip install --upgrade sol-lab`")
    pip_args = [a for a, on in (("--no-deps", args.no_deps), ("--no-build-isolation", args.no_build_isolation),
                                ("--upgrade", args.upgrade)) if on]
    code = pm.install(spec, on_output=_err, pip_args=pip_args)
    if code != 0:
        raise SolError(f"pip could not install {args.spec} (exit code {code}); its output is above")
    # New plugins, new versions, and (a reinstall) the plugins of the distribution just installed.
    ours = {normalize_dist(dist)} if dist else set()
    new = [i for i in pm.plugins() if not i.builtin and (before.get(i.name) != (i.version, i.dist)
                                                         or (i.dist and normalize_dist(i.dist) in ours))]
    if not new:
        named = f" ({dist})" if dist else ""
        raise SolError(f"{args.spec}: pip installed it{named}, but it registers no plugin under the entry-point "
                       f"group sol.plugins (see docs/plugins.md); `pip uninstall {dist or 'DIST'}` removes it")
    for i in new:
        status = "ok" if i.status == "ok" else f"broken: {i.error}"
        verb = "installed" if i.name not in before else "reinstalled"
        sys.stdout.write(f"{verb} plugin {i.name} {i.version} ({status})\n")
    return 0 if all(i.status == "ok" for i in new) else 1


def pip_spec(spec: str) -> str:
    """A folder or wheel named without ./ (`myplugin`) is the folder here, not a package on the index."""
    from pathlib import Path
    p = Path(spec).expanduser()
    project = p.is_dir() and ((p / "pyproject.toml").is_file() or (p / "setup.py").is_file())
    if project or (p.is_file() and p.suffix == ".whl"):
        return str(p.resolve())
    return spec


def run_uninstall(args) -> int:
    from ..errors import SolError
    code = manager(args).uninstall(args.name, on_output=_err)
    if code != 0:
        raise SolError(f"pip could not uninstall plugin {args.name} (exit code {code}); its output is above")
    sys.stdout.write(f"uninstalled plugin {args.name}\n")
    return 0


def run_enable(args) -> int:
    manager(args).enable(args.name)
    sys.stdout.write(f"enabled plugin {args.name}\n")
    return 0


def run_disable(args) -> int:
    manager(args).disable(args.name)
    sys.stdout.write(f"disabled plugin {args.name}\n")
    return 0
