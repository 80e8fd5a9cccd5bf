"""The package as users install it: `pip install .` (a wheel, not editable) in a fresh venv runs the
CLI from any folder with its own configs, and every third-party package the code imports is declared."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "pipeline", "stages", "launchers", "conf")


def third_party_imports() -> set[str]:
    """Top-level names of every module imported by pipeline/, stages/ and launchers/ (also inside
    functions) that is neither the standard library nor this package."""
    names = set()
    for folder in ("pipeline", "stages", "launchers"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("pipeline", "__future__")}


def declared(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalised ('huggingface_hub>=0.26' -> 'huggingface-hub')."""
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}


def read_pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_imported_package_is_a_declared_dependency():
    project = read_pyproject()["project"]
    core = declared(project["dependencies"])
    distributions = packages_distributions()
    imported = third_party_imports()
    assert {"numpy", "tqdm", "huggingface_hub", "matplotlib", "torch", "deepspeed"} <= imported
    missing = {}
    for name in sorted(imported):
        dists = {d.lower().replace("_", "-") for d in distributions.get(name, [])}
        assert dists, f"{name} is imported but not installed here"
        if not dists & core:
            missing[name] = sorted(dists)
    assert not missing, f"imported but not in [project] dependencies of pyproject.toml: {missing}"
    assert "matplotlib" in core  # the report after every run draws its plots with it


def test_every_subpackage_is_in_the_package_list():
    """pyproject lists the packages (stages/, launchers/, conf/ are mapped into pipeline/): a new
    subpackage of pipeline/ must be listed too, or the wheel goes without it."""
    setuptools = read_pyproject()["tool"]["setuptools"]
    found = {".".join(("pipeline", *init.parent.relative_to(ROOT / "pipeline").parts))
             for init in (ROOT / "pipeline").rglob("__init__.py")}
    mapped = set(setuptools["package-dir"])
    assert set(setuptools["packages"]) == found | mapped, sorted(found | mapped ^ set(setuptools["packages"]))


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv holding nothing but the wheel of this checkout (installed with --no-deps); the
    dependencies come from the current venv's site-packages through a plain path line in a .pth file
    (a path line runs no .pth of that folder, so the editable install's finder, which would map
    `pipeline` to this checkout, stays out)."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"  # built from a copy: the build writes build/ and *.egg-info next to its sources
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("rlhf_pipeline-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "current_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return venv


def run_in(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    # The current venv's tools too: DeepSpeed builds its CPU shm op with the first `ninja` on PATH,
    # and another ninja than the current venv's would rebuild the shared build cache (a minute).
    env["PATH"] = os.pathsep.join([str(venv / "bin"), os.path.dirname(sys.executable), env.get("PATH", "")])
    return subprocess.run([str(venv / "bin" / "python"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_wheel_installs_and_runs_from_any_folder(fresh_venv: Path, tmp_path: Path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run_in(fresh_venv, cwd, "-c", "import json, pipeline, pipeline.launchers.slurm, pipeline.stages.sft; "
                   "print(json.dumps([pipeline.__file__, str(pipeline.CONF_DIR)]))")
    assert where.returncode == 0, where.stderr[-3000:]
    module, conf = json.loads(where.stdout)
    assert Path(module).is_relative_to(fresh_venv) and Path(conf).is_relative_to(fresh_venv)
    assert (Path(conf) / "experiment" / "demo.yaml").is_file() and (Path(conf) / "hydra" / "launcher" / "slurm.yaml").is_file()
    for generic in ("stages", "launchers", "conf"):  # nothing generic at the top of site-packages
        assert run_in(fresh_venv, cwd, "-c", f"import {generic}").returncode != 0, generic

    helped = run_in(fresh_venv, cwd, "-m", "pipeline", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "python -m pipeline: InstructGPT's three steps" in helped.stdout and "experiment: demo" in helped.stdout

    dry = run_in(fresh_venv, cwd, "-m", "pipeline", "+experiment=demo", "run.dry_run=true", f"run.output_dir={cwd / 'dry'}")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "Plan fits." in dry.stdout and "(dry run: no weights were loaded)" in dry.stdout

    out = cwd / "run"
    real = run_in(fresh_venv, cwd, "-m", "pipeline", "+experiment=demo", "run.stages=[sft]", "stage.sft.max_steps=3",
                  f"run.output_dir={out}")
    assert real.returncode == 0, real.stdout[-3000:] + real.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())["sft"]
    assert result["steps"] == 3
    assert (out / "sft" / "final" / "config.json").is_file() and (out / "sft" / "final" / "model.safetensors").is_file()
    assert list((out / "plots").glob("*.png")), "no plots: matplotlib must come with the package"
    assert not (cwd / "outputs").exists() and not (cwd / "multirun").exists()
