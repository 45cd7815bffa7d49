"""Command-line options generated from a config dataclass, so a new field is an option at once
and its default is written in one place (the dataclass).

Examples:
    >>> import argparse
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Config:
    ...     epochs: int = 10
    ...     amp: bool = True
    ...     weights: str | None = None
    >>> parser = argparse.ArgumentParser()
    >>> add_config_arguments(parser, Config)
    >>> config_from_args(Config, parser.parse_args(["--epochs", "3", "--no-amp"]))
    Config(epochs=3, amp=False, weights=None)
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence

__all__ = ["add_config_arguments", "config_from_args"]

_SCALARS = (int, float, str)


def _option_type(hint) -> tuple[type, int | str | None] | None:
    """``(element type, nargs)`` for a field type the command line can carry, else ``None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None
    if hint in _SCALARS or hint is bool:
        return hint, None
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis and items[0] in _SCALARS:
            return items[0], "+"
        if items and all(i in _SCALARS for i in items) and len(set(items)) == 1:
            return items[0], len(items)
    return None


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                         names: Mapping[str, str] | None = None, help: Mapping[str, str] | None = None,
                         choices: Mapping[str, Sequence] | None = None) -> None:
    """One ``--field-name`` option per field of dataclass ``cls`` that the command line can carry
    (numbers, strings, booleans as ``--x/--no-x``, optional and tuple forms of these), with the
    field's default. ``skip`` leaves fields out; ``names`` renames options (``{"split_file":
    "split"}`` -> ``--split``); ``help`` adds help texts; ``choices`` the values a field may take
    (argparse refuses others before anything runs)."""
    hints = typing.get_type_hints(cls)
    names, help, choices = names or {}, help or {}, choices or {}
    for f in dataclasses.fields(cls):
        kind = _option_type(hints[f.name])
        if f.name in skip or kind is None:
            continue
        element, nargs = kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + names.get(f.name, f.name).replace("_", "-")
        text = help.get(f.name, "")
        if element is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=element, nargs=nargs, default=default,
                                choices=choices.get(f.name), help=f"{text} (default: {default})".strip())


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of ``cls`` from the options `add_config_arguments` added (tuples back
    as tuples), with ``overrides`` on top; fields without an option keep their defaults."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **overrides})
