"""Loader configurations: a frozen, validated dataclass that round-trips through YAML.

A configuration file holds the settings of one ``nostall.DataLoader`` that do not
depend on code (no dataset, sampler, collate_fn or generator)::

    batch_size: 32
    num_workers: 2
    persistent_workers: true

Missing keys take the loader's defaults; ``null`` means "the loader decides"
(``prefetch_factor``: torch's 2 per worker; ``persistent_workers``: true when
``num_workers > 0``; ``multiprocessing_context``: the platform's start method).

The settings may instead sit under a top-level ``loader:`` key. Then the file may
also hold ``notes:`` and ``measured:`` sections beside it (``nostall tune`` keeps
its measurements there); they are ignored when loading. Any other top-level key
beside ``loader:`` is an error, so a setting placed at the wrong level is caught.

The fields, their defaults and their checks come from ``nostall._options.OPTIONS``,
the table the loader's own argument checks come from too. This is the user-facing
configuration; :class:`nostall._config.PoolConfig` is the engine's internal one,
derived from a built loader. ``nostall config`` lives in ``nostall.cli._config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._options import OPTIONS, START_METHODS, WORKER_TYPES  # noqa: F401  (re-exported)

# Top-level sections allowed beside ``loader:``; their contents are not interpreted.
SECTIONS = ("notes", "measured")


class ConfigError(ValueError):
    """An invalid configuration value, key or file.

    ``key`` is the offending setting (None for file-level problems), ``problem`` the
    sentence after it, ``source`` the file name (None for values given in Python).
    """

    def __init__(self, key: str | None, problem: str, source: str | None = None):
        self.key = key
        self.problem = problem
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        if self.source is None:
            return f"`{self.key}` {self.problem}" if self.key else self.problem
        if self.key:
            return f"{self.source}: key `{self.key}`: {self.problem}"
        return f"{self.source}: {self.problem}"

    def __reduce__(self):  # picklable, e.g. to report from a measuring subprocess
        return (ConfigError, (self.key, self.problem, self.source))

    def located(self, source: str | None, prefix: str = "") -> ConfigError:
        """The same error, reported against ``source`` with the key under ``prefix``."""
        key = f"{prefix}{self.key}" if self.key else None
        return ConfigError(key, self.problem, source)


class _LoaderConfigMethods:
    """The behaviour of :class:`LoaderConfig`; its fields come from ``nostall._options.OPTIONS``."""

    def __post_init__(self):
        for name, option in OPTIONS.items():
            value = getattr(self, name)
            if not option.accepts(value):
                raise ConfigError(name, option.problem(value, yaml=True))
            if option.convert is not None:  # e.g. `timeout: 5` is kept as 5.0, so to_yaml is stable
                object.__setattr__(self, name, option.convert(value))
        # Combinations torch (or nostall) would refuse when the loader is built (or, timeout, iterated).
        if self.num_workers == 0:
            for name, bad in (("prefetch_factor", self.prefetch_factor is not None),
                              ("persistent_workers", self.persistent_workers is True),
                              ("multiprocessing_context", self.multiprocessing_context is not None),
                              ("timeout", self.timeout > 0),
                              ("worker_type", self.worker_type in ("auto", "ray"))):
                if bad:
                    value = getattr(self, name)
                    raise ConfigError(
                        name, f"needs `num_workers` > 0; got {name}={value!r} with num_workers=0. "
                        f"Set num_workers > 0 or remove `{name}`.")

    def to_dict(self) -> dict[str, Any]:
        """Every setting, in a stable order (the fields' order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> LoaderConfig:
        """A config from a mapping of settings, flat or under a ``loader:`` key.

        ``source`` (e.g. a file name) prefixes error messages.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(None, "expected a mapping of loader settings (`key: value` "
                              f"lines) at the top level; got {_yaml_kind(data)}.", source)
        prefix = ""
        if "loader" in data:
            for key in data:
                if key != "loader" and key not in SECTIONS:
                    raise ConfigError(
                        str(key), "is not allowed beside `loader:`; the top level may hold "
                        f"only loader, {', '.join(SECTIONS)}. Put settings under `loader:`.",
                        source)
            data, prefix = data["loader"], "loader."
            if not isinstance(data, Mapping):
                raise ConfigError("loader", f"must be a mapping of loader settings; got {data!r}.",
                                  source)
        known = list(OPTIONS)
        for key in data:
            if key not in known:
                raise ConfigError(f"{prefix}{key}", _unknown_problem(key, known), source)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise exc.located(source, prefix) from None

    def to_yaml(self, comment: str | None = None,
                sections: Mapping[str, Any] | None = None) -> str:
        """This config as YAML, keys in a stable order, after a comment header.

        ``comment`` adds header lines. ``sections`` (keys from ``SECTIONS``, e.g.
        ``{"measured": {...}}``) puts the settings under ``loader:`` and writes the
        sections after them; :meth:`from_yaml` ignores them.
        """
        header = ["nostall loader configuration: nostall.DataLoader.from_config(dataset, PATH).",
                  "null means the loader's default. Check with `nostall config --check PATH`."]
        if comment:
            header += comment.splitlines()
        doc: dict[str, Any] = self.to_dict()
        if sections:
            extra = [k for k in sections if k not in SECTIONS]
            if extra:
                raise ValueError(f"sections must be among {', '.join(SECTIONS)}; got {extra}.")
            doc = {"loader": doc, **sections}
        import yaml  # here: `import nostall` and `nostall config --list` do without it

        body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
        return "".join(f"# {line}".rstrip() + "\n" for line in header) + body

    @classmethod
    def from_yaml(cls, text: str | os.PathLike, source: str | None = None) -> LoaderConfig:
        """A config from YAML text, or from a file if given a ``Path``.

        A ``str`` is always YAML text (use :meth:`load` or a ``Path`` for files);
        ``source`` names it in error messages.
        """
        if isinstance(text, os.PathLike):
            return cls.load(text)
        import yaml

        source = source or "<string>"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(None, _yaml_problem(exc), source) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LoaderConfig:
        """A config from a YAML file; errors name the file (OSError if unreadable)."""
        return cls.from_yaml(Path(path).read_text(encoding="utf-8"), source=os.fspath(path))

    def save(self, path: str | os.PathLike, comment: str | None = None,
             sections: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`to_yaml` to ``path``."""
        Path(path).write_text(self.to_yaml(comment, sections), encoding="utf-8")

LoaderConfig = dataclasses.make_dataclass(
    "LoaderConfig",
    [(name, option.annotation, dataclasses.field(default=option.default)) for name, option in OPTIONS.items()],
    bases=(_LoaderConfigMethods,),
    frozen=True,
    namespace={"__module__": __name__},  # pickles and prints as nostall.core._loader_config.LoaderConfig
)
LoaderConfig.__doc__ = """The settings of one ``nostall.DataLoader`` that a configuration file holds.

Defaults are the loader's. Every value is checked when the object is made
(including by :func:`dataclasses.replace`); an invalid one raises
:class:`ConfigError` naming the key, the value and what is allowed.

Fields (one per option of ``nostall._options.OPTIONS``, in that order):

""" + "\n".join(f"* ``{name}`` (default ``{option.default!r}``): {option.doc}" for name, option in OPTIONS.items())


def _yaml_kind(data: Any) -> str:
    """What a YAML document turned out to be, in YAML's words."""
    if data is None:
        return "an empty document"
    for kind, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"),
                       (list, "a list")):
        if isinstance(data, kind):
            return name
    return f"a {type(data).__name__}"


def _unknown_problem(key: Any, known: list[str]) -> str:
    if key in SECTIONS:
        return ("is allowed only beside a `loader:` section holding the settings; "
                "move the settings under `loader:`.")
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"is not a known setting.{hint} Known keys: {', '.join(known)}."


def _yaml_problem(exc) -> str:
    """PyYAML's error as 'line L, column C: not valid YAML (problem).'"""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"not valid YAML ({problem})."
    return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({problem})."


# --------------------------------------------------------------------------- #
# The guide's templates
# --------------------------------------------------------------------------- #

TEMPLATES: dict[str, LoaderConfig] = {
    "small": LoaderConfig(batch_size=16, num_workers=1, persistent_workers=False),
    "medium": LoaderConfig(batch_size=32, num_workers=2, persistent_workers=True),
    "large": LoaderConfig(batch_size=32, num_workers=4, persistent_workers=True,
                          pin_memory=True, prefetch_factor=2),
}

TEMPLATE_USES: dict[str, str] = {
    "small": "< 1,000 samples: batch 16, 1 worker, not persistent",
    "medium": "1,000-10,000 samples: batch 32, 2 persistent workers",
    "large": "> 10,000 samples: batch 32, 4 persistent workers, pinned memory, prefetch 2",
}


def template(name: str) -> LoaderConfig:
    """The built-in template ``name`` (small, medium or large)."""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ConfigError(None, f"no template named {name!r}; choose one of "
                          f"{', '.join(TEMPLATES)}.") from None


# --------------------------------------------------------------------------- #
# Building loaders
# --------------------------------------------------------------------------- #


def loader_kwargs(config: LoaderConfig) -> dict[str, Any]:
    """Keyword arguments for ``nostall.DataLoader``; None values are left to its defaults."""
    return {k: v for k, v in config.to_dict().items() if v is not None}


def resolve(config: LoaderConfig | str | os.PathLike) -> LoaderConfig:
    """A LoaderConfig from a LoaderConfig, a template name or a YAML file path.

    A ``str`` naming a template is the template, even if a file of that name exists.
    """
    if isinstance(config, LoaderConfig):
        return config
    if isinstance(config, str) and config in TEMPLATES:
        return TEMPLATES[config]
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.exists():
            raise ConfigError(None, f"no template or file named {os.fspath(config)!r}; "
                              f"templates: {', '.join(TEMPLATES)}.")
        return LoaderConfig.load(path)
    raise TypeError(f"config must be a LoaderConfig, a template name or a path; "
                    f"got {type(config).__name__}.")
