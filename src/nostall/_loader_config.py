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

This is the user-facing configuration; :class:`nostall._config.PoolConfig` is the
engine's internal one, derived from a built loader.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.utils.data as tud
import yaml

WORKER_TYPES = ("process", "thread")
START_METHODS = ("fork", "spawn", "forkserver")
# Top-level sections allowed beside ``loader:``; their contents are not interpreted.
SECTIONS = ("notes", "measured")

_TORCH_HAS_IN_ORDER = "in_order" in inspect.signature(tud.DataLoader.__init__).parameters


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


# --------------------------------------------------------------------------- #
# Validation rules: one line per field.
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Rule:
    allowed: str                      # completes "must be ..." in error messages
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int in Python


def _int_from(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


def _number_from(low: float) -> Callable[[Any], bool]:
    return lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v >= low


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _or_none(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


def _any(*tests: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: any(t(v) for t in tests)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


_BOOL = _Rule("true or false", _is_bool)

RULES: dict[str, _Rule] = {
    "batch_size": _Rule("an int >= 1", _int_from(1)),
    "shuffle": _BOOL,
    "drop_last": _BOOL,
    "num_workers": _Rule("an int >= 0 or 'auto'", _any(_int_from(0), _one_of("auto"))),
    # torch accepts 0 when building but its worker iterator refuses it.
    "prefetch_factor": _Rule(
        "an int >= 1, 'auto', or null for torch's default (2)", _or_none(_any(_int_from(1), _one_of("auto")))),
    "persistent_workers": _Rule(
        "true, false, or null (true when num_workers > 0)", _or_none(_is_bool)),
    "pin_memory": _BOOL,
    "worker_type": _Rule(f"one of {_choices(WORKER_TYPES)}", _one_of(*WORKER_TYPES)),
    "multiprocessing_context": _Rule(
        f"one of {_choices(START_METHODS)}, or null for the platform's default",
        _or_none(_one_of(*START_METHODS))),
    "timeout": _Rule("a number of seconds >= 0", _number_from(0)),
    "in_order": _BOOL,
    "sync_dataset_attributes": _Rule(
        "true, false, or null (true for datasets with set_epoch or load_state_dict)", _or_none(_is_bool)),
}


@dataclass(frozen=True)
class LoaderConfig:
    """The settings of one ``nostall.DataLoader`` that a configuration file holds.

    Defaults are the loader's. Every value is checked when the object is made
    (including by :func:`dataclasses.replace`); an invalid one raises
    :class:`ConfigError` naming the key, the value and what is allowed.
    """

    batch_size: int = 1
    shuffle: bool = False
    drop_last: bool = False
    num_workers: int = 0
    prefetch_factor: int | None = None
    persistent_workers: bool | None = None
    pin_memory: bool = False
    worker_type: str = "process"
    multiprocessing_context: str | None = None
    timeout: float = 0.0
    in_order: bool = True
    sync_dataset_attributes: bool | None = None

    def __post_init__(self):
        for name, rule in RULES.items():
            value = getattr(self, name)
            if not rule.accepts(value):
                raise ConfigError(name, f"must be {rule.allowed}; got {value!r}.")
        # An int timeout (YAML `timeout: 5`) is stored as a float so to_yaml is stable.
        object.__setattr__(self, "timeout", float(self.timeout))
        # Combinations torch (or nostall) would refuse when the loader is built.
        if self.num_workers == 0:
            for name, bad in (("prefetch_factor", self.prefetch_factor is not None),
                              ("persistent_workers", self.persistent_workers is True),
                              ("multiprocessing_context", self.multiprocessing_context is not None),
                              ("timeout", self.timeout > 0)):
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
        known = [f.name for f in dataclasses.fields(cls)]
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


def _yaml_problem(exc: yaml.YAMLError) -> str:
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


def torch_kwargs(config: LoaderConfig) -> dict[str, Any]:
    """Keyword arguments giving torch's own DataLoader the same behaviour.

    ``worker_type`` is dropped (torch only has processes; threads make the same
    batches), and so is ``sync_dataset_attributes`` (torch has no such setting). ``persistent_workers`` is made explicit because nostall's default
    (persistent when num_workers > 0) is not torch's.

    One difference remains when ``persistent_workers`` is null, workers > 0 and a
    shuffling ``generator`` is given: nostall's default draws torch's base seed from
    the generator every epoch (as torch's transient workers do), torch's persistent
    workers only once, so shuffled orders agree in the first epoch only. Write
    ``persistent_workers: true`` in the config for identical batches in every epoch.
    """
    kw = loader_kwargs(config)
    del kw["worker_type"]
    kw.pop("sync_dataset_attributes", None)  # torch's persistent workers never see later changes
    if config.persistent_workers is None:
        kw["persistent_workers"] = config.num_workers > 0
    if not _TORCH_HAS_IN_ORDER:
        kw.pop("in_order")  # older torch always delivers in order
    return kw


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


def build_loader(dataset, config: LoaderConfig | str | os.PathLike, **overrides):
    """``nostall.DataLoader(dataset, ...)`` from a config; ``overrides`` win over it.

    Overrides take any DataLoader argument, e.g. ``generator`` or ``collate_fn``,
    which a file cannot hold.
    """
    from nostall._loader import DataLoader  # late: _loader imports this module

    return DataLoader.from_config(dataset, config, **overrides)


# --------------------------------------------------------------------------- #
# nostall config
# --------------------------------------------------------------------------- #


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``config`` subcommand to a ``nostall`` argument parser."""
    p = subparsers.add_parser(
        "config",
        help="print a loader configuration template or check a configuration file",
        description=(
            "Print one of the built-in loader configurations as YAML (redirect it to a "
            "file and load it with nostall.DataLoader.from_config(dataset, PATH)), list "
            "them, or check a configuration file."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--template", choices=list(TEMPLATES), metavar="NAME",
                      help=f"print a template as YAML ({', '.join(TEMPLATES)})")
    what.add_argument("--list", action="store_true", dest="list_templates",
                      help="list the templates and what each is for")
    what.add_argument("--check", metavar="PATH",
                      help="validate a configuration file; print it with defaults filled in")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Carry out ``nostall config``; 0 on success, 1 on an invalid or unreadable file."""
    if args.list_templates:
        width = max(map(len, TEMPLATES))
        for name in TEMPLATES:
            print(f"{name:<{width}}  {TEMPLATE_USES[name]}")
        return 0
    if args.template:
        print(TEMPLATES[args.template].to_yaml(
            comment=f"template {args.template!r}: {TEMPLATE_USES[args.template]}"), end="")
        return 0
    try:
        config = LoaderConfig.load(args.check)
    except ConfigError as exc:
        print(f"nostall config: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nostall config: cannot read {args.check}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(config.to_yaml(comment=f"{args.check}: valid (every setting shown, defaults filled in)"),
          end="")
    return 0
