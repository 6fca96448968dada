"""The CLI's help: wrapped to the terminal, with descriptions (the config keys a command
lists) built only when the help is printed, so building the parser imports no config class
(their modules import torch)."""

from __future__ import annotations

import argparse
import importlib
import shutil
import textwrap


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help at the terminal's width: $COLUMNS, else the terminal's, else 100 columns (argparse
    keeps 2 of them free). Options are wrapped as argparse wraps them; a description keeps its
    line breaks and each of its lines is wrapped on its own; an indented line (a config key a
    command lists) continues further indented, under its text."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None, **kwargs):
        if width is None:
            width = max(shutil.get_terminal_size((100, 24)).columns - 2, 20)
        super().__init__(prog, indent_increment, max_help_position, width, **kwargs)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            body = line.lstrip()
            lead = indent + line[:len(line) - len(body)]
            hang = lead + "    " if body != line else lead
            lines += textwrap.wrap(body, width, initial_indent=lead, subsequent_indent=hang,
                                   break_on_hyphens=False) if body else [""]
        return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description may be a function, called only when the help is
    printed (see keys), and whose help is wrapped to the terminal (Formatter)."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter,
                                             argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = Formatter
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        if callable(self.description):
            self.description = self.description()
        return super().format_help()


def keys(text: str, config: str):
    """A description read when the help is printed: `text`, then the keys of the config class
    `config` ("module:name"; a function of that name returns the class)."""
    def description() -> str:
        from mogrpo.config import describe

        module, name = config.split(":")
        cls = getattr(importlib.import_module(module), name)
        return text + describe(cls if isinstance(cls, type) else cls())
    return description
