"""What a stage may read of the config: exactly the keys its fingerprint covers, plus the few that
change how a run goes but never what it computes.

A stage receives a `ConfigView` instead of the Config. Reading a key inside the stage's fingerprint
gives the real value (a whole section, when the fingerprint covers it, as the typed dataclass);
reading any other key raises at once, naming the key and the stage. So a stage cannot come to depend
on a key that its fingerprint misses (a changed value would otherwise be silently ignored on resume),
and a typo in a stage's key list fails the first run of that stage instead of dropping a key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distill.errors import DistillError

# keys every stage may read without fingerprinting them: where the run lives, how processes wait, what
# precision it asks for (the effective precision is fingerprinted on its own), how fast it runs, and
# where its numbers are sent
UNFINGERPRINTED = ("run.name", "run.output_dir", "run.precision", "run.collective_timeout_minutes", "speed", "tracking")


def covers(keys: tuple[str, ...], path: str) -> bool:
    """Whether dotted `path` lies inside one of `keys` (a key covers itself and everything under it,
    list items of flattened configs included: `data.sources[0].name` is inside `data.sources`)."""
    return any(path == key or path.startswith((key + ".", key + "[")) for key in keys)


class ConfigView:
    """A read-only view of `target` (a config dataclass at dotted `path`) that lets `stage` read only
    what `allowed` covers."""

    def __init__(self, target: Any, allowed: tuple[str, ...], stage: str, path: str = ""):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        target, path = self._target, f"{self._path}.{name}" if self._path else name
        value = getattr(target, name)
        if name not in {f.name for f in dataclasses.fields(target)}:
            return value  # a property or method of the section (e.g. Config.run_dir), not a key
        if covers(self._allowed, path):
            return value
        if dataclasses.is_dataclass(value) and any(key.startswith(path + ".") for key in self._allowed):
            return ConfigView(value, self._allowed, self._stage, path)
        raise DistillError(f"stage '{self._stage}' read config key '{path}', which its fingerprint does not cover; "
                           f"add it to the stage's config keys (distill/stages/__init__.py)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise DistillError(f"stage '{self._stage}' tried to set config key '{self._path}.{name}': the config is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._path or 'config'} for stage {self._stage!r})"


def missing_keys(config: Any, keys: tuple[str, ...]) -> list[str]:
    """The dotted keys that name nothing in `config` (a typo in a stage's key list)."""
    missing = []
    for key in keys:
        node = config
        for part in key.split("."):
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                missing.append(key)
                break
            node = getattr(node, part)
    return missing
