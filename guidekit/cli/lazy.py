"""Command groups whose commands are built on first use, and commands whose help epilog is
written when shown: ``guidekit --help`` and ``guidekit plugins`` list every command without
building the ones whose options live beside torch code (a trainer's ``Lazy`` options, a
plugin's command module). Internal: plugins use :func:`guidekit.cli.params.lazy_group`.

Both work through typer's ``cls=`` (the click classes typer builds), so they hold across the
typer versions guidekit supports, with click or typer's own copy of it underneath.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from typer.core import TyperCommand, TyperGroup

__all__ = ["LazyCommands", "epilog_command_class", "lazy_group_class"]


class LazyCommands(MutableMapping[str, Any]):
    """A group's subcommands by name: ``names()`` lists them, ``build(name)`` builds one the
    first time it is looked up (running it, or a help that lists it)."""

    def __init__(self, names: Callable[[], list[str]], build: Callable[[str], Any]) -> None:
        self._names, self._build = names, build
        self._order: list[str] | None = None
        self._built: dict[str, Any] = {}

    def _keys(self) -> list[str]:
        if self._order is None:
            self._order = list(self._names())
        return self._order

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            if name not in self._keys():
                raise KeyError(name)
            self._built[name] = self._build(name)
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        if name not in self._keys():
            self._keys().append(name)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        self._keys().remove(name)
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:  # without building it
        return name in self._keys()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys()))

    def __len__(self) -> int:
        return len(self._keys())


def lazy_group_class(commands: Callable[[str], LazyCommands]) -> type[TyperGroup]:
    """A group class for ``typer.Typer(cls=...)`` whose subcommands are ``commands(name)``
    (``name``: the group's own), built one by one when looked up."""

    class LazyGroup(TyperGroup):
        def __init__(self, **attrs: Any) -> None:
            super().__init__(**attrs)
            self.commands = commands(self.name or "")

        def list_commands(self, ctx: Any) -> list[str]:
            return list(self.commands)  # names only (typer's own reads every command)

    return LazyGroup


def epilog_command_class(epilog: Callable[[], str | None]) -> type[TyperCommand]:
    """A command class for ``cli.command(cls=...)`` whose help epilog is ``epilog()``,
    written the first time it is read (the command's own help, or a docs generator)."""

    class EpilogCommand(TyperCommand):
        @property  # type: ignore[override]
        def epilog(self) -> str | None:
            if "_epilog" not in self.__dict__:
                self.__dict__["_epilog"] = epilog()
            return self.__dict__["_epilog"]

        @epilog.setter
        def epilog(self, value: str | None) -> None:  # click's __init__ sets it: None here
            if value is not None:
                self.__dict__["_epilog"] = value

    return EpilogCommand
