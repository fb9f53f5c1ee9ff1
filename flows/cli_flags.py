"""Command-line flags derived from `RefineryConfig`: the config is the one definition of every setting.

A command names the config sections it exposes (`Section("train")`, `Section("curate.quality",
prefix="quality-")`); each field becomes a flag whose name, type, allowed values, default and help come
from the field and its description, as litgpt derives its CLI from dataclasses. A flag's value is an
override of that field (`dest` "cfg.train.lr"), applied after `--config` and `--set`, so an unset flag
never hides what a config file says. Adding a setting to the config adds its flag.
"""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from core.config import PATH_FIELDS, RefineryConfig, parse_override

PREFIX = "cfg."          # namespace attributes that are config overrides
_ROOT = str(Path(__file__).resolve().parent.parent) + "/"


@dataclass(frozen=True)
class Section:
    path: str                                   # dotted config path, e.g. "curate.quality"
    prefix: str = ""                            # flag prefix where names would clash, e.g. "quality-"
    only: tuple[str, ...] = ()                  # expose only these fields (default: all)
    exclude: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)   # field -> extra flag users expect, e.g. "--delay"
    note: str = ""                              # what this command does with the section, where it differs


def model_at(path: str, root: type[BaseModel] = RefineryConfig) -> type[BaseModel]:
    node = root
    for part in path.split("."):
        node = _strip_optional(node.model_fields[part].annotation)
    return node


def _strip_optional(t: Any) -> Any:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _show(v: Any) -> str:
    if isinstance(v, list):
        return " ".join(_show(x) for x in v) or "[]"
    s = str(v)
    return s[len(_ROOT):] if s.startswith(_ROOT) else s   # bundled files: relative to the project


def _help(info, default: Any) -> str:
    """The field's description and its default, unless the description already says what the default is."""
    text = (info.description or "").rstrip(".")
    if "default" not in text:
        shown = "on" if default is True else "off" if default is False else "unset" if default is None \
            else _show(default)
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")


def sections_under(path: str, **custom: dict) -> list[Section]:
    """A Section for every model under `path` that has settings of its own, prefixed by its name
    (curate.rules.c4 -> --c4-...), so a section added to the config gets its flags with no edit here.
    `custom` maps a section's name to Section arguments (aliases, note)."""
    out = []
    model = model_at(path)
    if any(not _is_model(_strip_optional(f.annotation)) for f in model.model_fields.values()):
        name = path.rsplit(".", 1)[-1]
        out.append(Section(path, prefix=name.replace("_", "-") + "-", **custom.get(name, {})))
    for name, f in model.model_fields.items():
        if _is_model(_strip_optional(f.annotation)):
            out += sections_under(f"{path}.{name}", **custom)
    return out


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _metavar(name: str, t: type) -> str:
    return "PATH" if name in PATH_FIELDS else {str: "TEXT", int: "INT", float: "NUM"}.get(t, t.__name__.upper())


def add_section(p: argparse.ArgumentParser, sec: Section) -> None:
    model = model_at(sec.path)
    g = p.add_argument_group(f"{sec.path} settings" + (f" ({sec.note})" if sec.note else ""))
    for name, info in model.model_fields.items():
        if (sec.only and name not in sec.only) or name in sec.exclude:
            continue
        t = _strip_optional(info.annotation)
        origin = typing.get_origin(t)
        if origin is dict or (isinstance(t, type) and issubclass(t, BaseModel)):
            continue                            # maps and subsections: --config or --set only
        flags = [f"--{sec.prefix}{name.replace('_', '-')}"] + ([sec.aliases[name]] if name in sec.aliases else [])
        kw: dict[str, Any] = dict(dest=f"{PREFIX}{sec.path}.{name}", default=argparse.SUPPRESS,
                                  help=_help(info, info.get_default(call_default_factory=True)))
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kw["choices"] = list(typing.get_args(t))
        elif origin is list:
            item = typing.get_args(t)[0]
            kw.update(nargs="+", action="extend", type=item,
                      metavar=_metavar(name, item))
        else:
            kw.update(type=t, metavar=_metavar(name, t))
        g.add_argument(*flags, **kw)


def add_positional(p: argparse.ArgumentParser, dotted: str, metavar: str) -> None:
    """A positional argument that is a config field (e.g. finetune's BASE = finetune.base)."""
    section, name = dotted.rsplit(".", 1)
    info = model_at(section).model_fields[name]
    p.add_argument(f"{PREFIX}{dotted}", metavar=metavar, help=(info.description or "").replace("%", "%%"))


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--set items, then flags (a flag is the more specific): dotted field -> value."""
    out = dict(parse_override(s) for s in getattr(args, "set", []))
    out.update({k[len(PREFIX):]: v for k, v in vars(args).items() if k.startswith(PREFIX)})
    return out
