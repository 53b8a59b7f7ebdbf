"""Command-line flags from the options dataclasses: each field a `--snake-case` flag with its help text (or its
metadata's `flag` name), so that every command reads its settings through one path, dataclass to flags and back
(TrainConfig, LoadOptions, ProbeOptions, AblateOptions). A field with metadata `flag=False` is set by the command
itself; one with metadata `parse` is taken as text and parsed when the command runs."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Optional

import typer


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a dataclass that are flags (metadata flag=False: the command sets the field itself)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True) is not False]


def config_parameters(cls: type, positional: tuple[str, ...]) -> list[inspect.Parameter]:
    """Turn dataclass fields into typer parameters: `--snake-case` flags (or metadata `flag`), help text from
    the field; a field with metadata `parse` is a flag of text, read when the command runs."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in flag_fields(cls):
        annotation = hints[f.name]
        help_text = f.metadata.get("help", "")
        if f.name in positional:
            info = typer.Argument(..., help=help_text, show_default=False, metavar=f.name.upper())
        else:
            flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
            if annotation in (bool, Optional[bool]):
                flag = f"{flag}/--no-{flag[2:]}"
            default = f.metadata["parse"][0] if "parse" in f.metadata else f.default
            annotation = str if "parse" in f.metadata else annotation
            info = typer.Option(default, flag, help=help_text, show_default=default is not None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    return params


def command_with_config(*classes: type, positional: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give `func(config, ..., **options)` the fields of each dataclass (one instance per class, in order) as
    flags, in front of its own options."""

    def wrap(func: Callable) -> Callable:
        own = list(inspect.signature(func, eval_str=True).parameters.values())[len(classes):]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        fields = {cls: flag_fields(cls) for cls in classes}
        names = {f.name for cls in classes for f in fields[cls]}

        def command(**kwargs: Any) -> Any:
            def value(f: dataclasses.Field) -> Any:
                return f.metadata["parse"][1](kwargs[f.name]) if "parse" in f.metadata else kwargs[f.name]

            configs = [cls(**{f.name: value(f) for f in fields[cls]}) for cls in classes]
            return func(*configs, **{k: v for k, v in kwargs.items() if k not in names})

        command.__signature__ = inspect.Signature(
            [p for cls in classes for p in config_parameters(cls, positional)] + own)
        command.__doc__ = func.__doc__
        command.__name__ = func.__name__
        return command

    return wrap
