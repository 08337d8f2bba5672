"""The one registry idiom of specdec: a module-level dict from a registered name to an entry, filled
by a `register_<kind>(name, config=...)` decorator in the package that owns the kind (drafters in
specdec.trainer.drafters, objectives in specdec.trainer.objectives). A name registered twice is an
error naming both modules; an unknown name is an error naming the recipe key and the choices."""

from typing import Any


class UnknownName(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


def add_entry(table: dict[str, Any], name: str, entry: Any, *, kind: str, module: str) -> None:
    if name in table:
        raise ValueError(f"{kind} {name!r} is registered twice: {table[name].module} and {module}")
    table[name] = entry


def lookup(table: dict[str, Any], name: str, *, key: str, kind: str) -> Any:
    """table[name], or an UnknownName that gives the recipe key and the registered names."""
    if name not in table:
        raise UnknownName(f"{key}: {name!r} is not a registered {kind}; choose one of {', '.join(sorted(table))}")
    return table[name]
