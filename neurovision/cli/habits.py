"""Command-line habits for the tool subcommands (``prepare``, ``inspect``, ``localize``, ``sweep``, ``encode``,
``report``): each takes what people type from argparse tools *and* the jsonargparse values that work in YAML.

One mechanism, :func:`normalise`, rewrites the command line before the parser sees it, keyed on what the parser
declares (and on its subcommands' parsers); nothing is special-cased per command:

- a jsonargparse ``bool`` option: bare ``--json`` means ``--json=true``, ``--no_zscore`` (or ``--no-zscore``) means
  ``--zscore=false``; ``--json true`` and ``--force=false`` keep working (a word after a bare flag that is no
  boolean is a positional argument where the parser has one, else the flag's value, refused in the flag's name);
- a jsonargparse ``list`` option: ``--subjects 1 2 5 7`` (space-separated) means ``--subjects=[]`` followed by
  jsonargparse's own appends ``--subjects+=1 ...``, so each value is parsed (and refused) as its element type;
  ``--subjects [1,2]`` keeps working;
- an argparse ``store_true`` flag: ``--quiet true|false`` and ``--quiet=false`` work besides bare ``--quiet``;
- an argparse list (``nargs='+'``/``'*'``, or ``action='append'``): ``--concepts [red,green]`` works besides
  ``--concepts red green``;
- an option spelt with ``-`` or ``_`` where the parser declares the other (``--batch_size`` for ``--batch-size``).

:func:`json_parser` and :func:`argparse_parser` make parsers that apply it in ``parse_args`` and list the habit
forms in ``--help``; an error is one line, exit 2, never a usage screen (jsonargparse's raises
``argparse.ArgumentError``, which ``neurovision.cli`` prints as one line; argparse's prints the same line itself).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import jsonargparse

BOOL_WORDS = frozenset({"true", "false", "yes", "no", "on", "off"})  # YAML booleans (what jsonargparse reads)
NULL_WORDS = frozenset({"null", "~"})
_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's test of a negative number (a value, not an option)


# ------------------------------------------------------------------------------------------------ what a flag is
def _typehint(action: argparse.Action) -> Any:
    return getattr(action, "_typehint", None)  # a jsonargparse ActionTypeHint


def is_json_bool(action: argparse.Action) -> bool:
    """A jsonargparse option typed ``bool`` or ``bool | None``."""
    hint = _typehint(action)
    if hint is None:
        return False
    if hint is bool:
        return True
    args = getattr(hint, "__args__", None) or ()
    return bool(args) and set(args) <= {bool, type(None)} and bool in args


def is_json_list(action: argparse.Action) -> bool:
    """A jsonargparse list option (jsonargparse declares its append form ``--name+`` for list types only)."""
    return _typehint(action) is not None and any(o.endswith("+") for o in action.option_strings)


def is_flag(action: argparse.Action) -> bool:
    """An argparse ``store_true`` flag."""
    return isinstance(action, argparse._StoreTrueAction)


def is_argparse_list(action: argparse.Action) -> bool:
    return _typehint(action) is None and (action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction))


def _nullable(action: argparse.Action) -> bool:
    return type(None) in (getattr(_typehint(action), "__args__", None) or ())


def _long(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--") and not o.endswith("+")),
                action.option_strings[0])


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            out.update(a.choices)
    return out


def _positionals(parser: argparse.ArgumentParser) -> bool:
    """Whether ``parser`` declares a positional argument (a token after a bare flag may be its value)."""
    return any(not a.option_strings and not isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def _lookup(parser: argparse.ArgumentParser, name: str) -> tuple[argparse.Action | None, bool]:
    """The action an option string means, and whether it is a ``--no_<name>`` negation of a jsonargparse bool."""
    table = parser._option_string_actions
    for n in (name, _swap(name)):
        if n in table:
            return table[n], False
    for prefix in ("--no_", "--no-"):
        if name.startswith(prefix):
            for n in ("--" + name[len(prefix):], _swap("--" + name[len(prefix):])):
                if n in table and is_json_bool(table[n]):
                    return table[n], True
    return None, False


def _swap(name: str) -> str:
    """``--a_b`` <-> ``--a-b`` (after the leading dashes)."""
    body = name.lstrip("-")
    dashes = name[: len(name) - len(body)]
    return dashes + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


# ------------------------------------------------------------------------------------------------ the rewrite
def _is_value(tok: str) -> bool:
    return not tok.startswith("-") or bool(_NUMBER.match(tok)) or tok == "-"


def _list_items(text: str) -> list[str] | None:
    """``[a, b,c]`` -> ``['a', 'b', 'c']`` as typed (no YAML typing: ``[01]`` stays ``01``); None if not a list."""
    t = text.strip()
    if not (t.startswith("[") and t.endswith("]")):
        return None
    inner = t[1:-1].strip()
    if not inner:
        return []
    return [s.strip().strip("'") for s in next(csv.reader([inner], skipinitialspace=True))]


def normalise(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with the habit forms of :mod:`neurovision.cli.habits` rewritten to what ``parser`` parses.

    Tokens the parser does not declare, and everything after ``--``, pass through unchanged (the parser reports
    them). A subcommand name switches to its parser for the options after it."""
    argv = list(argv)
    out: list[str] = []
    subs = _subparsers(parser)
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            out += argv[i - 1:]
            break
        if _is_value(tok):
            if tok in subs:
                parser = subs[tok]
                subs = _subparsers(parser)
            out.append(tok)
            continue
        name, eq, value = tok.partition("=")
        action, negated = _lookup(parser, name) if name.startswith("--") else (parser._option_string_actions.get(
            name), False)
        if action is None or name.endswith("+"):
            out.append(tok)
            continue
        opt = name if name in action.option_strings else _long(action)
        following: list[str] = []  # the values after the option, up to the next option
        while not eq and i + len(following) < len(argv) and _is_value(argv[i + len(following)]) \
                and argv[i + len(following)] != "--":
            following.append(argv[i + len(following)])
        nxt = following[0] if following else None
        if is_json_bool(action):
            words = BOOL_WORDS | (NULL_WORDS if _nullable(action) else frozenset())
            if negated:
                out.append(tok if eq else f"{opt}=false")
            elif eq:
                out.append(f"{opt}={value}")
            elif nxt is not None and (nxt.lower() in words or not _positionals(parser)):
                out.append(f"{opt}={nxt}")  # with no positional to take it, a bad value is the option's error
                i += 1
            else:
                out.append(f"{opt}=true")
        elif is_json_list(action):
            values = [value] if eq else following
            if not values or (len(values) == 1 and (_list_items(values[0]) is not None
                                                     or (_nullable(action) and values[0].lower() in NULL_WORDS))):
                out.append(f"{opt}={values[0]}" if values else tok)
            else:
                out += [f"{opt}=[]", *(f"{opt}+={v}" for v in values)]
            i += 0 if eq else len(values)
        elif is_flag(action):
            said = value if eq else (nxt if nxt is not None and (nxt.lower() in BOOL_WORDS or not _positionals(parser))
                                     else None)
            if said is not None and said.lower() in BOOL_WORDS:
                if said.lower() in ("true", "yes", "on"):
                    out.append(opt)
            elif said is not None:
                out.append(f"{opt}={said}")  # argparse's error names the flag and the value
            else:
                out.append(opt)
            i += 0 if eq or said is None else 1
        elif is_argparse_list(action):
            items = _list_items(value if eq else (nxt or ""))
            if items is not None and (eq or len(following) == 1):
                out += [opt, *items] if not isinstance(action, argparse._AppendAction) else \
                    [t for item in items for t in (opt, item)]
                i += 0 if eq else 1
            else:
                out.append(f"{opt}={value}" if eq else opt)
        else:
            out.append(f"{opt}={value}" if eq else opt)
            if eq:
                n = 0
            elif action.nargs == argparse.REMAINDER:
                n = len(argv) - i
            elif isinstance(action.nargs, int):
                n = min(action.nargs, len(following))
            else:
                n = {None: 1, "?": 1}.get(action.nargs, len(following))
                n = min(n, len(following))
            out += argv[i:i + n]
            i += n
    return out


# ------------------------------------------------------------------------------------------------ help
def describe(parser: argparse.ArgumentParser) -> None:
    """Add the habit forms to the help of ``parser``'s options (and its subcommands'), once."""
    for a in parser._actions:
        if getattr(a, "_habits_described", False) or not a.option_strings or a.help == argparse.SUPPRESS:
            continue
        opt = _long(a)
        note = None
        if is_json_bool(a):
            note = f"also bare {opt} = true" + (f", --no_{opt[2:]} = false" if a.default is True else "")
        elif is_json_list(a):
            note = f"also {opt} A B ..."
        elif is_flag(a):
            note = f"also {opt} true|false"
        elif is_argparse_list(a):
            note = f"also {opt} [A,B]"
        if note is not None:
            a.help = f"{a.help} ({note})" if a.help else f"({note})"
        a._habits_described = True  # type: ignore[attr-defined]
    for sub in _subparsers(parser).values():
        describe(sub)


# ------------------------------------------------------------------------------------------------ parsers
class _Habits:
    """Mixin: ``parse_args`` takes the habit forms; ``--help`` lists them."""

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        argv = sys.argv[1:] if args is None else args
        return super().parse_args(normalise(self, argv), *rest, **kwargs)  # type: ignore[misc,arg-type]

    def format_help(self, *args: Any, **kwargs: Any) -> str:
        describe(self)  # type: ignore[arg-type]
        return super().format_help(*args, **kwargs)  # type: ignore[misc]


class ArgparseParser(_Habits, argparse.ArgumentParser):  # type: ignore[misc]  # parse_args: a wider signature
    """argparse with the habits; an error is one line, ``<prog>: error: <message>``, exit 2 (no usage screen), the
    same line ``neurovision.cli`` prints for its other user errors, also under ``python -m`` or a direct ``main``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def argparse_parser(**kwargs: Any) -> ArgparseParser:
    """An :class:`argparse.ArgumentParser` that takes the habits and reports an error in one line."""
    return ArgparseParser(**kwargs)


class JsonParser(_Habits, jsonargparse.ArgumentParser):  # type: ignore[misc]  # parse_args: a wider signature
    """jsonargparse with the habits."""


def json_parser(**kwargs: Any) -> JsonParser:
    """A ``jsonargparse.ArgumentParser`` (``exit_on_error=False`` unless given) that takes the habits."""
    kwargs.setdefault("exit_on_error", False)
    return JsonParser(**kwargs)
