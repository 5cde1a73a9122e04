"""Loader configurations: validation messages, YAML round trips, templates, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.utils.data as tud
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import nostall
from nostall.cli import _config
from nostall.core._loader_config import (
    START_METHODS,
    TEMPLATES,
    WORKER_TYPES,
    ConfigError,
    LoaderConfig,
    loader_kwargs,
    template,
)
from nostall._options import OPTIONS
from nostall.core._torch_versions import HAS_IN_ORDER

SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
KNOWN_KEYS = ("batch_size, shuffle, drop_last, num_workers, prefetch_factor, persistent_workers, "
              "pin_memory, pin_memory_device, worker_type, ray_actor_options, multiprocessing_context, timeout, in_order, "
              "stats, max_worker_restarts, hang_timeout, on_hang, on_sample_error, max_skipped_fraction, "
              "max_inflight_bytes, sync_dataset_attributes")
WORKER_TYPE_HINT = (" Use 'thread' for I/O-bound datasets that release the GIL, 'process' otherwise, "
                    "'auto' to let nostall choose, 'ray' for more CPUs than this machine has.")


def torch_kwargs(config: LoaderConfig) -> dict:
    """Keyword arguments giving torch's own DataLoader the same behaviour as ``config``.

    nostall's own settings are dropped (torch only has processes; threads make the same
    batches; torch has no supervision or attribute sync). ``persistent_workers`` is made
    explicit because nostall's default (persistent when num_workers > 0) is not torch's.
    With ``persistent_workers`` null, workers > 0 and a shuffling generator, nostall draws
    torch's base seed every epoch (as torch's transient workers do), torch's persistent
    workers only once: shuffled orders then agree in the first epoch only.
    """
    kw = {k: v for k, v in loader_kwargs(config).items() if OPTIONS[k].owner == "torch"}
    if config.persistent_workers is None:
        kw["persistent_workers"] = config.num_workers > 0
    if not HAS_IN_ORDER:
        kw.pop("in_order")  # older torch always delivers in order
    return kw


def _error(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        LoaderConfig(**kw)
    return str(info.value)


# --------------------------------------------------------------------------- templates


def test_templates_have_the_guides_values():
    small, medium, large = TEMPLATES["small"], TEMPLATES["medium"], TEMPLATES["large"]
    assert (small.batch_size, small.num_workers, small.persistent_workers) == (16, 1, False)
    assert (medium.batch_size, medium.num_workers, medium.persistent_workers) == (32, 2, True)
    assert (large.batch_size, large.num_workers, large.persistent_workers) == (32, 4, True)
    assert large.pin_memory and large.prefetch_factor == 2
    assert not small.pin_memory and not medium.pin_memory


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_round_trips(name):
    config = template(name)
    text = config.to_yaml(comment="a comment\nover two lines")
    assert text.startswith("# ")
    assert LoaderConfig.from_yaml(text) == config
    assert LoaderConfig.from_dict(config.to_dict()) == config
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(LoaderConfig)]


def test_unknown_template_names_the_choices():
    with pytest.raises(ConfigError) as info:
        template("huge")
    assert str(info.value) == "no template named 'huge'; choose one of small, medium, large."


# --------------------------------------------------------------------------- round trips


@st.composite
def configs(draw) -> LoaderConfig:
    workers = draw(st.integers(0, 64))
    many = workers > 0  # torch allows these settings only with worker processes
    timeout = st.floats(0, 1e300, allow_nan=False) | st.integers(0, 10**6)
    return LoaderConfig(
        batch_size=draw(st.integers(1, 2**40)),
        shuffle=draw(st.booleans()),
        drop_last=draw(st.booleans()),
        num_workers=workers,
        prefetch_factor=draw(st.none() | st.integers(1, 10**4)) if many else None,
        persistent_workers=draw(st.sampled_from([None, False, True] if many else [None, False])),
        pin_memory=draw(st.booleans()),
        worker_type=draw(st.sampled_from(WORKER_TYPES if many else ("process", "thread"))),
        multiprocessing_context=draw(st.sampled_from((None, *START_METHODS))) if many else None,
        timeout=draw(timeout) if many else 0,
        in_order=draw(st.booleans()),
        sync_dataset_attributes=draw(st.sampled_from([None, False, True])),
        stats=draw(st.booleans()),
        max_worker_restarts=draw(st.integers(0, 100)),
        hang_timeout=draw(st.none() | st.floats(0.001, 1e6) | st.integers(1, 10**6)),
        on_hang=draw(st.sampled_from(["restart", "raise"])),
        on_sample_error=draw(st.sampled_from(["raise", "skip"])),
        max_skipped_fraction=draw(st.floats(0.0, 1.0) | st.sampled_from([0, 1])),
        max_inflight_bytes=draw(st.none() | st.integers(1, 2**50)),
    )


@settings(deadline=None, max_examples=150)
@given(configs())
def test_valid_configs_round_trip_exactly(config):
    text = config.to_yaml()
    again = LoaderConfig.from_yaml(text)
    assert again == config
    assert again.to_yaml() == text  # the text is stable too
    assert isinstance(again.timeout, float)
    assert LoaderConfig.from_yaml(config.to_yaml(sections={"measured": {"batches_per_s": 1.5}})) \
        == config


def test_save_and_load(tmp_path):
    path = tmp_path / "loader.yaml"
    TEMPLATES["large"].save(path)
    assert LoaderConfig.load(path) == TEMPLATES["large"]
    assert LoaderConfig.load(str(path)) == TEMPLATES["large"]
    assert LoaderConfig.from_yaml(path) == TEMPLATES["large"]  # a Path is a file, a str is text


def test_missing_keys_take_the_loaders_defaults():
    assert LoaderConfig.from_yaml("batch_size: 8\n") == LoaderConfig(batch_size=8)
    assert LoaderConfig.from_yaml("timeout: 5\nnum_workers: 1\n").timeout == 5.0


# --------------------------------------------------------------------------- invalid values

INVALID = [
    ("batch_size", 0, "an int >= 1"),
    ("batch_size", True, "an int >= 1"),
    ("batch_size", 2.0, "an int >= 1"),
    ("batch_size", None, "an int >= 1"),
    ("shuffle", 1, "true or false"),
    ("shuffle", "maybe", "true or false"),
    ("drop_last", None, "true or false"),
    ("num_workers", -3, "an int >= 0 or 'auto'"),
    ("num_workers", 1.5, "an int >= 0 or 'auto'"),
    ("num_workers", "2", "an int >= 0 or 'auto'"),
    ("num_workers", "Auto", "an int >= 0 or 'auto'"),
    ("prefetch_factor", 0, "an int >= 1, 'auto', or null for torch's default (2)"),
    ("prefetch_factor", -1, "an int >= 1, 'auto', or null for torch's default (2)"),
    ("persistent_workers", "sometimes", "true, false, or null (true when num_workers > 0)"),
    ("pin_memory", "yes please", "true or false"),
    ("worker_type", "greenlet", "one of 'process', 'thread', 'auto', 'ray'"),
    ("worker_type", None, "one of 'process', 'thread', 'auto', 'ray'"),
    ("multiprocessing_context", "threads",
     "one of 'fork', 'spawn', 'forkserver', or null for the platform's default"),
    ("timeout", -1, "a number of seconds >= 0"),
    ("timeout", math.nan, "a number of seconds >= 0"),
    ("timeout", math.inf, "a number of seconds >= 0"),
    ("timeout", "10s", "a number of seconds >= 0"),
    ("in_order", [True], "true or false"),
    ("stats", "yes", "true or false"),
    ("pin_memory_device", None, "a string (torch deprecates it: the current accelerator is used)"),
    ("max_worker_restarts", -2, "an int >= 0"),
    ("max_worker_restarts", True, "an int >= 0"),
    ("hang_timeout", 0, "null (automatic) or a number of seconds > 0"),
    ("hang_timeout", "30s", "null (automatic) or a number of seconds > 0"),
    ("on_hang", "ignore", "one of 'restart', 'raise'"),
    ("on_sample_error", "log", "one of 'raise', 'skip'"),
    ("max_skipped_fraction", 1.5, "a number from 0 to 1"),
    ("max_skipped_fraction", False, "a number from 0 to 1"),
    ("max_inflight_bytes", 0, "null or an int > 0 (bytes)"),
    ("max_inflight_bytes", 2.0**30, "null or an int > 0 (bytes)"),
    ("sync_dataset_attributes", "yes",
     "null (automatic: on for datasets with set_epoch or load_state_dict), true or false"),
]


@pytest.mark.parametrize("key, value, allowed", INVALID)
def test_invalid_values_name_key_value_and_allowed_range(key, value, allowed):
    base = {"num_workers": 2}  # so settings that need workers are judged on their own
    hint = WORKER_TYPE_HINT if key == "worker_type" else ""
    assert _error(**{**base, key: value}) == f"`{key}` must be {allowed}; got {value!r}.{hint}"
    with pytest.raises(ConfigError) as info:
        LoaderConfig.from_dict({**base, key: value}, source="loader.yaml")
    assert str(info.value) == f"loader.yaml: key `{key}`: must be {allowed}; got {value!r}.{hint}"
    assert info.value.key == key


def test_the_briefs_example_messages(tmp_path, monkeypatch):
    assert _error(num_workers=-3) == "`num_workers` must be an int >= 0 or 'auto'; got -3."
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loader.yaml").write_text("batch_size: 32\nnum_workers: -3\n")
    with pytest.raises(ConfigError) as info:
        LoaderConfig.load("loader.yaml")
    assert str(info.value) == "loader.yaml: key `num_workers`: must be an int >= 0 or 'auto'; got -3."


def test_sync_dataset_attributes_round_trips_and_reaches_the_loader(tmp_path):
    import nostall

    path = tmp_path / "loader.yaml"
    path.write_text("num_workers: 2\nsync_dataset_attributes: true\n")
    config = LoaderConfig.load(path)
    assert config.sync_dataset_attributes is True and LoaderConfig.from_yaml(config.to_yaml()) == config
    with nostall.DataLoader.from_config(tud.TensorDataset(torch.arange(4)), path) as loader:
        assert loader.sync_dataset_attributes is True and loader._config.sync_dataset
    assert "sync_dataset_attributes" not in torch_kwargs(config)  # torch has no such argument
    with pytest.raises(ConfigError, match="sync_dataset_attributes"):
        LoaderConfig(sync_dataset_attributes="yes")


def test_auto_round_trips_and_builds_an_auto_loader(tmp_path):
    import nostall

    config = LoaderConfig(num_workers="auto", prefetch_factor="auto")
    assert LoaderConfig.from_yaml(config.to_yaml()) == config
    path = tmp_path / "loader.yaml"
    config.save(path)
    loader = nostall.DataLoader.from_config(tud.TensorDataset(torch.arange(10)), path)
    assert loader.num_workers_setting == "auto" and loader.prefetch_factor_setting == "auto"
    assert loader._config.auto_workers and loader._config.auto_prefetch
    loader.close()


@pytest.mark.parametrize("key, value", [
    ("prefetch_factor", 2), ("persistent_workers", True),
    ("multiprocessing_context", "fork"), ("timeout", 5.0), ("worker_type", "auto"),
])
def test_settings_that_need_workers_fail_at_load_time_like_the_loader_would(key, value):
    message = _error(num_workers=0, **{key: value})
    assert message == (f"`{key}` needs `num_workers` > 0; got {key}={value!r} with num_workers=0. "
                       f"Set num_workers > 0 or remove `{key}`.")
    # ... because the loader itself refuses the combination: when it is built, or (timeout, as
    # torch's does) when it is iterated.
    if key == "timeout":
        loader = nostall.DataLoader(tud.TensorDataset(torch.arange(4)), num_workers=0, **{key: value})
        with pytest.raises(AssertionError, match="requires timeout == 0"):
            iter(loader)
        return
    with pytest.raises(ValueError):
        nostall.DataLoader(tud.TensorDataset(torch.arange(4)), num_workers=0, **{key: value})


def test_persistent_false_without_workers_is_fine():
    assert LoaderConfig(persistent_workers=False).num_workers == 0


# --------------------------------------------------------------------------- one options model

# The constructor's arguments a file cannot hold: objects and code.
CODE_ARGUMENTS = {"self", "dataset", "sampler", "batch_sampler", "collate_fn", "worker_init_fn", "generator"}
# Every option set away from its default, valid together.
NOT_DEFAULTS = dict(
    batch_size=3, shuffle=True, drop_last=True, num_workers=2, prefetch_factor=3, persistent_workers=False,
    pin_memory=True, pin_memory_device="", worker_type="thread", multiprocessing_context="spawn", timeout=5.0,
    ray_actor_options={"num_cpus": 2}, in_order=False, stats=False, max_worker_restarts=7, hang_timeout=12.5, on_hang="raise",
    on_sample_error="skip", max_skipped_fraction=0.25, max_inflight_bytes=2**20, sync_dataset_attributes=True,
)


def _loader_settings(loader) -> dict:
    """A built loader's settings, read back from the loader under LoaderConfig's keys."""
    read = {
        "shuffle": lambda: isinstance(loader.sampler, tud.RandomSampler),
        "num_workers": lambda: loader.num_workers_setting,
        "prefetch_factor": lambda: loader.prefetch_factor_setting,
        "multiprocessing_context": lambda: loader.multiprocessing_context.get_start_method(),
        "stats": lambda: loader.stats is not None,
    }
    return {name: read[name]() if name in read else getattr(loader, name) for name in OPTIONS}


def test_every_constructor_option_is_a_configuration_key():
    import inspect

    parameters = set(inspect.signature(nostall.DataLoader.__init__).parameters) - CODE_ARGUMENTS
    assert parameters == set(OPTIONS) == {f.name for f in dataclasses.fields(LoaderConfig)}
    assert set(NOT_DEFAULTS) == set(OPTIONS)
    assert all(NOT_DEFAULTS[name] != option.default or name == "pin_memory_device"  # torch deprecates it
               for name, option in OPTIONS.items())


def test_every_constructor_option_round_trips_through_yaml_into_the_loader(tmp_path):
    config = LoaderConfig(**NOT_DEFAULTS)
    path = tmp_path / "loader.yaml"
    config.save(path)
    again = LoaderConfig.load(path)
    assert again == config and again.to_dict() == NOT_DEFAULTS
    with nostall.DataLoader.from_config(tud.TensorDataset(torch.arange(12)), path) as loader:
        assert _loader_settings(loader) == NOT_DEFAULTS
    with nostall.DataLoader(tud.TensorDataset(torch.arange(12)), **NOT_DEFAULTS) as loader:
        assert LoaderConfig(**_loader_settings(loader)) == config


def test_worker_type_auto_is_accepted_in_yaml():
    config = LoaderConfig.from_yaml("num_workers: 2\nworker_type: auto\n")
    assert config.worker_type == "auto" and LoaderConfig.from_yaml(config.to_yaml()) == config
    with nostall.DataLoader.from_config(tud.TensorDataset(torch.arange(8)), config) as loader:
        assert loader.worker_type == "auto"


@pytest.mark.parametrize("key, value", [
    ("worker_type", "greenlet"), ("max_worker_restarts", -2), ("hang_timeout", -1), ("on_hang", "ignore"),
    ("on_sample_error", "log"), ("max_skipped_fraction", 2), ("max_inflight_bytes", 0),
    ("sync_dataset_attributes", "yes"),
])
def test_the_constructor_and_the_file_refuse_the_same_values_with_the_same_words(key, value):
    with pytest.raises(ValueError) as built:
        nostall.DataLoader(tud.TensorDataset(torch.arange(4)), num_workers=2, **{key: value})
    message = _error(num_workers=2, **{key: value})
    assert str(built.value) == OPTIONS[key].error(value).args[0]
    assert message == f"`{key}` {OPTIONS[key].problem(value, yaml=True)}"
    # The same sentence, in YAML's words for None, True and False.
    allowed, got = str(built.value).split("; got ")
    words = {"None": "null", "True": "true", "False": "false"}
    assert message == re.sub(r"\b(None|True|False)\b", lambda m: words[m.group(1)], allowed) + "; got " + got


# --------------------------------------------------------------------------- keys and files


def test_unknown_key_lists_known_keys_and_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        LoaderConfig.from_dict({"num_worker": 2}, source="loader.yaml")
    assert str(info.value) == ("loader.yaml: key `num_worker`: is not a known setting. "
                               f"Did you mean `num_workers`? Known keys: {KNOWN_KEYS}.")
    with pytest.raises(ConfigError) as info:
        LoaderConfig.from_dict({"colour": "blue"})
    assert str(info.value) == f"`colour` is not a known setting. Known keys: {KNOWN_KEYS}."


def test_settings_may_sit_under_loader_beside_notes_and_measured():
    text = ("loader:\n  batch_size: 32\n  num_workers: 2\n"
            "notes: written by nostall tune\nmeasured:\n  batches_per_s: 812.5\n")
    assert LoaderConfig.from_yaml(text) == LoaderConfig(batch_size=32, num_workers=2)
    with pytest.raises(ConfigError, match=r"^f.yaml: key `loader.num_workers`: must be an int "
                                          r">= 0 or 'auto'; got -1\.$"):
        LoaderConfig.from_yaml("loader:\n  num_workers: -1\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"key `loader.batchsize`: is not a known setting. "
                                          r"Did you mean `batch_size`\?"):
        LoaderConfig.from_yaml("loader:\n  batchsize: 3\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"^f.yaml: key `num_workers`: is not allowed beside "
                                          r"`loader:`; the top level may hold only loader, notes, "
                                          r"measured\."):
        LoaderConfig.from_yaml("loader:\n  batch_size: 3\nnum_workers: 2\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"key `measured`: is allowed only beside a `loader:`"):
        LoaderConfig.from_yaml("batch_size: 3\nmeasured: {}\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"^f.yaml: key `loader`: must be a mapping of loader "
                                          r"settings; got 3\.$"):
        LoaderConfig.from_yaml("loader: 3\n", source="f.yaml")


def test_sections_are_written_under_loader():
    text = TEMPLATES["small"].to_yaml(sections={"measured": {"epoch_s": [1.0, 0.5]}})
    doc = yaml.safe_load(text)
    assert list(doc) == ["loader", "measured"] and doc["measured"] == {"epoch_s": [1.0, 0.5]}
    with pytest.raises(ValueError, match="sections must be among notes, measured"):
        TEMPLATES["small"].to_yaml(sections={"loader": {}})


@pytest.mark.parametrize("text, where, problem", [
    ("batch_size: 32\n  num_workers: 2\n", "line 2, column 14",
     "mapping values are not allowed here"),
    ("batch_size: 32\nnum_workers: [2, 4\n", "line 3, column 1", "expected ',' or ']'"),
    ("batch_size: 32\n\tnum_workers: 2\n", "line 2, column 1",
     "found character '\\t' that cannot start any token"),
])
def test_malformed_yaml_names_file_and_line(tmp_path, monkeypatch, text, where, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loader.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        LoaderConfig.load("loader.yaml")
    message = str(info.value)
    assert message.startswith(f"loader.yaml: {where}: not valid YAML ("), message
    assert problem in message


@pytest.mark.parametrize("text, kind", [
    ("- 1\n- 2\n", "a list"), ("", "an empty document"),
    ("# only a comment\n", "an empty document"),
    ("32\n", "a number"), ("just words\n", "a string"), ("true\n", "a boolean"),
])
def test_a_document_that_is_not_a_mapping_is_an_error(text, kind):
    with pytest.raises(ConfigError) as info:
        LoaderConfig.from_yaml(text, source="loader.yaml")
    assert str(info.value) == ("loader.yaml: expected a mapping of loader settings (`key: value` "
                               f"lines) at the top level; got {kind}.")


# --------------------------------------------------------------------------- building loaders


def test_loader_kwargs_omit_nones_and_torch_kwargs_make_defaults_explicit():
    medium = TEMPLATES["medium"]
    assert loader_kwargs(LoaderConfig(num_workers=2)) == {
        "batch_size": 1, "shuffle": False, "drop_last": False, "num_workers": 2,
        "pin_memory": False, "pin_memory_device": "", "worker_type": "process", "timeout": 0.0,
        "in_order": True, "stats": True, "max_worker_restarts": 3, "on_hang": "restart",
        "on_sample_error": "raise", "max_skipped_fraction": 0.01}
    kw = torch_kwargs(LoaderConfig(num_workers=2, worker_type="thread"))
    assert "worker_type" not in kw and kw["persistent_workers"] is True
    assert torch_kwargs(LoaderConfig())["persistent_workers"] is False
    assert torch_kwargs(medium)["persistent_workers"] is True
    assert torch_kwargs(TEMPLATES["small"])["persistent_workers"] is False


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on 2 CPUs
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_both_loaders_accept_the_kwargs(name):
    dataset = tud.TensorDataset(torch.arange(8))
    torch_loader = tud.DataLoader(dataset, **torch_kwargs(TEMPLATES[name]))
    assert torch_loader.batch_size == TEMPLATES[name].batch_size
    with nostall.DataLoader.from_config(dataset, name) as loader:  # no iteration: no workers start
        assert loader.num_workers == TEMPLATES[name].num_workers
        assert loader.persistent_workers == torch_loader.persistent_workers


def test_from_config_from_a_file_with_overrides(tmp_path):
    path = tmp_path / "loader.yaml"
    TEMPLATES["medium"].save(path)
    dataset = tud.TensorDataset(torch.arange(8))
    for config in (path, str(path)):
        with nostall.DataLoader.from_config(dataset, config, batch_size=4) as loader:
            assert (loader.batch_size, loader.num_workers) == (4, 2)
    with pytest.raises(ConfigError, match=r"no template or file named 'nope.yaml'; templates: "
                                          r"small, medium, large\."):
        nostall.DataLoader.from_config(dataset, "nope.yaml")


def _torch_epochs(dataset, epochs: int, **kw) -> list:
    loader = tud.DataLoader(dataset, generator=torch.Generator().manual_seed(0), **kw)
    try:
        return [list(loader) for _ in range(epochs)]
    finally:
        if loader._iterator is not None and loader.persistent_workers:
            loader._iterator._shutdown_workers()


def _assert_same_epochs(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for e, (epoch_got, epoch_expected) in enumerate(zip(got, expected)):
        assert len(epoch_got) == len(epoch_expected), f"epoch {e}"
        for b, (batch_got, batch_expected) in enumerate(zip(epoch_got, epoch_expected)):
            for g, x in zip(batch_got, batch_expected, strict=True):
                assert torch.equal(g, x), f"epoch {e} batch {b}: {g} != {x}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("persistent", [True, None])
def test_from_config_gives_torchs_batches_with_two_workers(persistent):
    dataset = tud.TensorDataset(torch.arange(64), torch.randn(64, 3))
    config = LoaderConfig(batch_size=5, shuffle=True, num_workers=2, persistent_workers=persistent,
                          multiprocessing_context="fork")  # fork: no torch import per worker
    with nostall.DataLoader.from_config(dataset, config, generator=torch.Generator().manual_seed(0)) as loader:
        got = [list(loader) for _ in range(2)]
    assert not torch.equal(got[0][0][0], got[1][0][0])  # shuffled anew each epoch
    expected = _torch_epochs(dataset, 2, **torch_kwargs(config))
    if persistent:
        _assert_same_epochs(got, expected)
    else:
        # nostall's default keeps workers alive but draws a base seed from `generator`
        # every epoch, as torch's transient workers do; torch's persistent workers draw
        # it once. So the shuffled order agrees with torch_kwargs' loader in epoch 1,
        # and with transient torch in every epoch.
        _assert_same_epochs(got[:1], expected[:1])
        transient = _torch_epochs(dataset, 2, **{**torch_kwargs(config),
                                                 "persistent_workers": False})
        _assert_same_epochs(got, transient)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nostall")
    _config.add_parser(parser.add_subparsers())
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


def test_config_list(capsys):
    assert _run("config", "--list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(TEMPLATES)
    assert "1,000-10,000 samples" in lines[1]


def test_config_check_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "loader.yaml"
    path.write_text("num_workers: 3\n")
    assert _run("config", "--check", str(path)) == 0
    out = capsys.readouterr().out
    assert LoaderConfig.from_yaml(out) == LoaderConfig(num_workers=3)
    assert "persistent_workers: null" in out  # defaults filled in


def test_config_check_unreadable_file(tmp_path, capsys):
    assert _run("config", "--check", str(tmp_path / "missing.yaml")) == 1
    err = capsys.readouterr().err
    assert err.startswith("nostall config: cannot read ") and "No such file" in err


def test_config_needs_one_action(capsys):
    with pytest.raises(SystemExit) as info:
        _run("config")
    assert info.value.code == 2


def _cli(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    """Run ``nostall config ...`` in a fresh interpreter on the working tree's nostall."""
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    return subprocess.run([sys.executable, "-m", "nostall", "config", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=50, check=False)


@pytest.mark.timeout(60)
def test_cli_prints_a_template_as_yaml():
    proc = _cli("--template", "medium")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == TEMPLATES["medium"].to_dict()
    assert LoaderConfig.from_yaml(proc.stdout) == TEMPLATES["medium"]


@pytest.mark.timeout(60)
def test_cli_check_of_a_bad_file_exits_1_with_the_message(tmp_path):
    (tmp_path / "loader.yaml").write_text("batch_size: 32\nnum_workers: -3\n")
    proc = _cli("--check", "loader.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == ("nostall config: loader.yaml: key `num_workers`: must be an int >= 0 or 'auto'; "
                           "got -3.\n")


def test_from_config_classmethod(tmp_path):
    import nostall

    path = tmp_path / "loader.yaml"
    template("small").save(path)
    with nostall.DataLoader.from_config(torch.utils.data.TensorDataset(torch.arange(20)), path,
                                        num_workers=0) as loader:
        assert loader.batch_size == 16 and loader.num_workers == 0
        assert [b[0].tolist() for b in loader] == [list(range(16)), list(range(16, 20))]
    assert nostall.LoaderConfig is LoaderConfig
