"""What the command lines share: absl flags, ``--help`` that exits 0, one-line errors.

``main``, ``evaluate`` and ``profile`` all take absl flags (``--name=value`` or ``--name value``;
booleans as ``--flag`` / ``--noflag``). Flag names use underscores; the hyphenated spellings of
the earlier argparse versions (``--calibration-batches``, ``--input-size``) are accepted as
aliases. Any parse error is one line ``<prog>: error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import ast
import difflib
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence

from absl import flags

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
EXIT_USAGE = 2


def one_line(e: BaseException | str) -> str:
    """The useful part of an error whose text may embed a traceback (config_flags does)."""
    text = str(e).replace("\\n", "\n")
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    return " ".join(": ".join(_unquote(t) for t in text.split(": ")).split())


def _unquote(part: str) -> str:
    """A KeyError's message arrives as its repr (``'\\'lrr\\' Did you mean ...'``): unwrap it."""
    part = " ".join(part.split())
    if len(part) > 1 and part[0] == part[-1] == "'" and "\\'" in part:
        try:
            value = ast.literal_eval(part)
            if isinstance(value, str):
                return value
        except (ValueError, SyntaxError):
            pass
    return part


def fail(prog: str | None, message: BaseException | str, code: int = EXIT_USAGE):
    """Prints ``[<prog>: ]error: <message>`` (one line) to stderr and exits with ``code``."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _underscored(arg: str) -> str:
    """``--calibration-batches=4`` -> ``--calibration_batches=4`` (flag names only)."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def format_flags(fv: flags.FlagValues, names: Iterable[str]) -> str:
    """``  --name: help (default: x)`` for each named flag, in the given order."""
    lines = []
    for name in names:
        flag = fv[name]
        default = "" if flag.default is None else f" (default: {flag.default})"
        if flag.flag_type() == "bool":
            default = f" (default: on; --no{name} turns it off)" if flag.default else ""
        lines.append(f"  --{name}: {flag.help}{default}")
    return "\n".join(lines)


def parse(fv: flags.FlagValues, argv: Sequence[str] | None, prog: str,
          usage: Callable[[], str], *,
          error_prog: str | None = "", positional: bool = False) -> list[str]:
    """Parses ``argv`` (without the program name; ``None``: ``sys.argv[1:]``) into ``fv`` and
    returns ``[prog, *positional arguments]``.

    ``--help`` prints ``usage()`` and exits 0; a bad flag, or a positional argument unless
    ``positional``, exits 2 with one line naming ``error_prog`` (default ``prog``; ``None``:
    no name)."""
    error_prog = prog if error_prog == "" else error_prog
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_ARGS for a in args):
        print(usage().rstrip())
        sys.exit(0)
    fv.unparse_flags()  # a second call in one process starts from the defaults again
    args = [shipped_config(a) for a in args]
    try:
        rest = fv([prog] + [_underscored(a) for a in args])
    except Exception as e:  # noqa: BLE001 - absl and config_flags raise several types
        fail(error_prog, unknown_field(fv, args) or f"invalid flags: {one_line(e)}")
    if len(rest) > 1 and not positional:
        fail(error_prog, f"unexpected arguments {rest[1:]}; see {prog} --help")
    return rest


def _leaves(node, prefix: str) -> list[str]:
    out = []
    for key in node.keys():
        value = node[key]
        out += _leaves(value, f"{prefix}.{key}") if hasattr(value, "keys") else [
            f"{prefix}.{key}"]
    return out


def _config_value(fv: flags.FlagValues, flag: str, args: Sequence[str]):
    """The config a ``DEFINE_config_file`` flag loads (config_flags checks the overrides while
    parsing, so after a bad one the flag holds no value: load the file again)."""
    files = [a.partition("=")[2] for a in args if a.startswith(f"--{flag}=")]
    try:
        value = fv[flag].value
        if value is None and files:
            value = fv[flag].parser.parse(files[-1])
        value.keys()  # a file that failed to load gives an object that raises here
        return value
    except Exception:  # noqa: BLE001 - the file's own error is reported instead
        return None


def unknown_field(fv: flags.FlagValues, args: Sequence[str]) -> str | None:
    """For an override of a config field that does not exist (``--config.optim.bogus=1``):
    the full path it names and the closest valid field (the same name in another section
    first, else the nearest spelling in its own section); None if no override names one."""
    for arg in args:
        name = _underscored(arg)[2:].partition("=")[0] if arg.startswith("--") else ""
        flag, _, path = name.partition(".")
        root = _config_value(fv, flag, args) if path and flag in fv else None
        if not hasattr(root, "keys"):
            continue
        node, parts = root, path.split(".")
        for i, key in enumerate(parts):
            if not hasattr(node, "keys"):
                break  # a leaf indexed further: not an unknown name
            if key in node:
                node = node[key]
                continue
            here = ".".join([flag] + parts[:i])
            leaves = _leaves(root, flag)
            named = [p for p in leaves if p.rsplit(".", 1)[1] == key] or [
                p for p in leaves if p.rsplit(".", 1)[1] in
                difflib.get_close_matches(key, [q.rsplit(".", 1)[1] for q in leaves], 1, 0.8)]
            best = named[0] if named else f"{here}." + difflib.get_close_matches(
                key, list(node.keys()), 1, 0.0)[0]
            return f"--{name}: {here} has no field {key!r}; the closest valid key is {best}"
    return None


def _config_dirs() -> list[str]:
    """Where config files are looked for: ``./configs``, the source checkout's ``configs/``,
    and the ``us3l_jax/configs/`` a wheel install carries (setup.py ships them there)."""
    package = os.path.dirname(os.path.abspath(__file__))
    return ["configs", os.path.join(os.path.dirname(package), "configs"),
            os.path.join(package, "configs")]


def shipped_config(arg: str) -> str:
    """``--config=configs/<file>[:<arg>]`` names the config of the installed package (the
    checkout's ``configs/`` of an editable install, or the wheel's ``us3l_jax/configs/``) when
    there is no such file here: the README's commands work from any directory after
    ``pip install``, not only from a checkout."""
    prefix = "--config=configs/"
    if not arg.startswith(prefix):
        return arg
    name, colon, rest = arg[len(prefix):].partition(":")
    if os.path.exists("configs/" + name):
        return arg
    for d in _config_dirs()[1:]:
        if os.path.isfile(os.path.join(d, name)):
            return f"--config={os.path.join(d, name)}{colon}{rest}"
    return arg


def config_files(directory: str | None = None) -> list[tuple[str, str]]:
    """``(path, summary)`` of each config file, from ``directory`` or else the first of
    :func:`_config_dirs` that exists. The summary is the docstring's first paragraph, whole
    (one sentence in every shipped config), with its line breaks folded."""
    for d in [directory] if directory else _config_dirs():
        if os.path.isdir(d):
            break
    else:
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".py") and not name.startswith("_"):
            path = os.path.join(d, name)
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            out.append((os.path.relpath(path), " ".join(doc.strip().split("\n\n")[0].split())))
    return out


def configs_help(columns: int | None = None) -> str:
    """The config list of ``--help``: each summary wrapped to the terminal (``columns``,
    default its width) under its own column, never cut."""
    files = config_files()
    if not files:
        return ("Configs: none found in ./configs (they ship with the source checkout and "
                "inside the wheel as us3l_jax/configs/; pass --config=<path to a config file>).")
    width = max(len(p) for p, _ in files)
    columns = columns or shutil.get_terminal_size((100, 24)).columns
    indent = " " * (width + 4)
    wrap = max(40, columns - len(indent))
    lines = []
    for p, doc in files:
        body = textwrap.wrap(doc, wrap) or [""]
        lines.append(f"  {p.ljust(width)}  {body[0]}")
        lines.extend(indent + more for more in body[1:])
    return "Configs (--config=<file>[:<arg>]; each file's docstring lists its args):\n" + \
        "\n".join(lines)
