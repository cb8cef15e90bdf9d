"""argparse arguments generated from a config dataclass, and the dataclass built back from the namespace.

The dataclass is the one source of each option: its field's ``metadata["help"]`` is the help text, its
default is the option's default (shown in the help by this module, never restated by hand), an ``Enum``
type gives the choices, ``bool`` gives ``--flag/--no-flag``, ``tuple[X, ...]`` a comma list,
``dict[str, str]`` a repeatable ``KEY=VALUE``. A field named ``*_s`` (seconds) is spelled without the
suffix (``startup_timeout_s`` -> ``--startup-timeout``). ``include``/``exclude`` pick the fields;
:class:`Flag` covers the few CLI-only spellings, parsers and defaults (aliases such as ``--no-build`` are
plain ``add_argument(..., dest=<field>)`` calls beside the generated ones). Validation stays in the dataclass's
``__post_init__``: build it inside :func:`common.cli.run_cli` so its errors are one line and exit 2::

    add_config_arguments(parser, ServerConfig, flags={"http_port": Flag(default=8000)}, exclude={"extra_args"})
    ...
    config = config_from_args(ServerConfig, namespace)
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

_MISSING = dataclasses.MISSING
_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "<unset>"})()  # "no CLI-only default"


@dataclasses.dataclass(frozen=True)
class Flag:
    """CLI-only overrides for one field; anything left unset comes from the field."""

    names: tuple[str, ...] = ()  # option strings, e.g. ("--max-accuracy-drop",); default: --field-name
    default: Any = _UNSET  # a CLI-only default (say why where it is used); default: the field's
    help: str | None = None  # default: metadata["help"]
    type: Callable[[str], Any] | None = None  # parser of one command-line string
    show: Callable[[Any], str] | None = None  # how the default is shown in the help
    positional: bool = False
    metavar: str | None = None


def option_name(field: dataclasses.Field) -> str:
    """``startup_timeout_s`` -> ``--startup-timeout``; ``max_length`` -> ``--max-length``."""
    name = field.name[:-2] if field.name.endswith("_s") and len(field.name) > 2 else field.name
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _enum_parser(cls: type[enum.Enum]) -> Callable[[str], enum.Enum]:
    def parse(text: str) -> enum.Enum:
        try:
            return cls(text)
        except ValueError:
            known = ", ".join(str(m.value) for m in cls)
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {known})") from None

    parse.__name__ = cls.__name__
    return parse


def _scalar_parser(tp: Any) -> Callable[[str], Any] | None:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_parser(tp)
    if tp in (int, float, str, Path):
        return tp
    return None


def _list_parser(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    parse.__name__ = "comma list"
    return parse


class _KeyValueAction(argparse.Action):
    """``--label KEY=VALUE`` (repeatable) into a dict."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        key, sep, value = values.partition("=")
        if not sep or not key:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {values!r}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: value})


def _wrap(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A custom parser's own error (any exception) becomes argparse's one-line usage error."""
    def parse_arg(text: str) -> Any:
        try:
            return parse(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            raise
        except Exception as exc:  # a package error such as LoadtestError
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_arg.__name__ = getattr(parse, "__name__", "value")
    return parse_arg


def show_value(value: Any) -> str:
    """A default as the user would type it: enum values, comma lists, paths."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return ",".join(show_value(v) for v in value)
    return str(value)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return _MISSING


def _kwargs(field: dataclasses.Field, tp: Any, flag: Flag) -> dict[str, Any]:
    """add_argument keyword arguments of one field (type, choices, action, default, help)."""
    tp, _ = _unwrap_optional(tp)
    default = flag.default if flag.default is not _UNSET else _field_default(field)
    kwargs: dict[str, Any] = {}
    item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
    if flag.type is not None:
        kwargs["type"] = _wrap(flag.type)
    elif tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is dict and typing.get_args(tp) == (str, str):
        kwargs.update(action=_KeyValueAction, metavar="KEY=VALUE")
    elif item_tp is not None and _scalar_parser(item_tp) is not None and typing.get_args(tp)[1:] == (...,):
        kwargs["type"] = _list_parser(_scalar_parser(item_tp))
        kwargs["metavar"] = "A,B,..."
        if isinstance(item_tp, type) and issubclass(item_tp, enum.Enum):
            kwargs["metavar"] = ",".join(str(m.value) for m in item_tp)
    elif _scalar_parser(tp) is not None:
        kwargs["type"] = _scalar_parser(tp)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            kwargs["choices"] = list(tp)
            kwargs["metavar"] = "{" + ",".join(str(m.value) for m in tp) + "}"
    else:
        raise TypeError(f"{field.name}: no command-line form for {tp!r}; exclude it or give a Flag(type=...)")
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    text = (flag.help if flag.help is not None else field.metadata.get("help", "")).replace("%", "%%")
    if default is _MISSING:
        kwargs["required"] = not flag.positional
    else:
        kwargs["default"] = default
        if default is not None and default not in ((), {}):  # nothing to show for an empty list/dict
            shown = (flag.show or show_value)(default).replace("%", "%%")
            if tp is bool:
                name = (flag.names or (option_name(field),))[0]
                shown = name if default else "--no-" + name[2:]
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
    if kwargs.get("action") is _KeyValueAction:
        text = f"{text} (repeatable)" if text else "repeatable"
    kwargs["help"] = text
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                         flags: Mapping[str, Flag] | None = None, exclude: Iterable[str] = (),
                         include: Iterable[str] | None = None) -> None:
    """One option per init field of the dataclass ``cls`` (dest = the field name), in field order.

    ``include`` (only these fields) or ``exclude`` (all but these) pick the fields; ``flags`` overrides.
    """
    flags = dict(flags or {})
    excluded = set(exclude)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(flags) | excluded | set(include or ())) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    if include is not None:
        excluded |= names - set(include)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.name in excluded:
            continue
        flag = flags.get(field.name, Flag())
        kwargs = _kwargs(field, hints[field.name], flag)
        if flag.positional:
            kwargs.pop("required", None)
            if "default" in kwargs:
                kwargs["nargs"] = "?"
            parser.add_argument(field.name, **kwargs)
        else:
            names = flag.names or (option_name(field),)
            if kwargs.get("action") is None:
                kwargs.setdefault("metavar", names[0].lstrip("-").upper().replace("-", "_"))
            action = parser.add_argument(*names, dest=field.name, **kwargs)
            action.help = kwargs["help"]  # some Pythons' BooleanOptionalAction append their own default


def config_from_args(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """``cls(**fields found in namespace, **overrides)``: its ``__post_init__`` validates."""
    kwargs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(namespace, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)
