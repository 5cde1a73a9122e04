"""What importing nostall costs: the command line starts without torch, the loader
imports none of the command-line tools, and the public names resolve lazily."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
# The command line's modules and their harness: never imported by a loader.
TOOLS = ("nostall.cli._main", "nostall.cli._bench", "nostall.cli._measure", "nostall.cli._tune", "nostall.cli._doctor",
         "nostall.cli._workloads", "nostall.cli._plot", "nostall.observe._script", "nostall.cli._resolve",
         "nostall.cli._config")

# Runs `python -m nostall ARGS` in this interpreter, then reports which modules it imported.
_RUN_CLI = """
import json, runpy, sys
sys.argv = ["nostall", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("nostall", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC_DIR, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=100, check=False)


def _cli(*args: str) -> tuple[str, int, set]:
    proc = _python(_RUN_CLI, *args)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc.stdout, report["code"], set(report["modules"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [("--help",), ("config", "--list"), ("config", "--template", "medium"), ()])
def test_the_command_line_answers_without_importing_torch(args):
    out, code, modules = _cli(*args)
    assert code == (2 if not args else 0) and (out or not args)
    assert "torch" not in modules and "numpy" not in modules
    assert not modules & {"nostall.cli._measure", "nostall.cli._bench", "nostall.cli._doctor", "nostall.cli._tune"}
    if args and args[0] == "--help":
        assert all(name in out for name in ("demo", "bench", "tune", "config", "doctor"))
        assert "yaml" not in modules


@pytest.mark.timeout(120)
def test_a_subcommand_gets_its_full_parser():
    out, code, modules = _cli("doctor", "--help")
    assert code == 0 and "--num-workers" in out and "nostall.cli._doctor" in modules


@pytest.mark.timeout(120)
def test_a_loader_imports_none_of_the_command_line_tools():
    proc = _python("import json, sys, nostall\n"
                   "for workers in (0, 2):\n"
                   "    with nostall.DataLoader(list(range(4)), batch_size=2, num_workers=workers,\n"
                   "                            multiprocessing_context='fork' if workers else None) as loader:\n"
                   "        assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]\n"
                   "print(json.dumps(sorted(sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    modules = set(json.loads(proc.stdout))
    assert not modules & set(TOOLS)
    assert "ray" not in modules and "nostall.workers._ray_pool" not in modules  # only worker_type="ray" imports Ray


@pytest.mark.timeout(120)
def test_worker_type_ray_without_ray_installed_says_how_to_install_it():
    # sys.modules["ray"] = None makes `import ray` fail as it does where Ray is not installed.
    proc = _python("import sys\n"
                   "sys.modules['ray'] = None\n"
                   "import nostall\n"
                   "try:\n"
                   "    nostall.DataLoader(list(range(4)), num_workers=1, worker_type='ray')\n"
                   "except ImportError as exc:\n"
                   "    print(exc)\n")
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'nostall[ray]'" in proc.stdout


@pytest.mark.timeout(120)
def test_import_nostall_alone_does_not_import_torch_and_public_names_resolve():
    proc = _python("import sys, nostall\n"
                   "print('torch' in sys.modules)\n"
                   "from nostall import DataLoader, LoaderConfig, flat\n"
                   "print(nostall.DataLoader is DataLoader, 'torch' in sys.modules)\n"
                   "print(sorted(set(nostall.__all__) - set(dir(nostall))))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["False", "True True", "[]"]


def test_public_names_and_errors():
    import nostall
    from nostall import DataLoader

    assert nostall.DataLoader is DataLoader and DataLoader.__module__ == "nostall.core._loader"
    assert set(nostall.__all__) <= set(dir(nostall))
    for name in nostall.__all__:
        assert getattr(nostall, name) is not None
    with pytest.raises(AttributeError, match="module 'nostall' has no attribute 'Dataloader'"):
        nostall.Dataloader  # noqa: B018
    with pytest.raises(ImportError):
        from nostall import Nope  # noqa: F401
