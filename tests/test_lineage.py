"""What a stage runs is what DVC recorded: the stage's own checkout of the library, and every
library module that can change its outputs listed in its dvc.yaml deps."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, dvc, make_dvc_project
from ddpm.lineage import as_deps, expand_deps, import_closure, stage_code


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if d.startswith(("src/", "stages/"))]


def dep_problems(pipeline: dict) -> list[str]:
    """What each stage's deps miss, or list without using, against its script's imports; and
    deps not written as `lineage.as_deps` writes them (a folder when the stage uses all of
    its code, files otherwise)."""
    problems = []
    for name, stage in pipeline["stages"].items():
        wanted = set(stage_code(REPO / f"stages/{name}.py", REPO))
        listed = code_deps(stage)
        covered = expand_deps(listed, REPO)
        problems += [f"{name}: {dep} is imported but not a dep" for dep in sorted(wanted - covered)]
        problems += [f"{name}: {dep} is a dep but not imported" for dep in sorted(covered - wanted)]
        if not problems and sorted(listed) != as_deps(sorted(wanted), REPO):
            problems.append(f"{name}: deps {sorted(listed)} should read {as_deps(sorted(wanted))}")
    return problems


def pipeline() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_lists_the_modules_it_imports():
    assert dep_problems(pipeline()) == []


def test_the_deps_check_sees_one_missing_dep():
    broken = copy.deepcopy(pipeline())
    deps = broken["stages"]["generate"]["deps"]
    deps.remove("src/ddpm/train/fastpath.py")
    assert dep_problems(broken) == ["generate: src/ddpm/train/fastpath.py is imported but not "
                                    "a dep"]


def test_the_deps_check_sees_a_folder_the_stage_uses_only_part_of():
    broken = copy.deepcopy(pipeline())
    deps = broken["stages"]["generate"]["deps"]
    deps.remove("src/ddpm/train/fastpath.py")
    deps.append("src/ddpm/train")
    problems = dep_problems(broken)
    assert "generate: src/ddpm/train/loop.py is a dep but not imported" in problems


def test_a_whole_subpackage_is_one_folder_dep():
    deps = code_deps(pipeline()["stages"]["train"])
    assert {"src/ddpm/model", "src/ddpm/train", "src/ddpm/evaluate/fid"} <= set(deps)
    assert "src/ddpm/model/unet.py" in expand_deps(deps)


def test_lazy_imports_count():
    closure = import_closure(REPO / "stages" / "train.py")
    assert "src/ddpm/model/samplers.py" in closure and "src/ddpm/train/distributed.py" in closure
    assert "src/ddpm/model/__init__.py" in closure  # importing ddpm.model.unet runs it
    assert all((REPO / path).is_file() for path in closure)


def test_params_yaml_sets_every_key():
    """So that config.py's defaults never decide a pipeline result behind DVC's back."""
    import dataclasses

    from ddpm.config import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in dataclasses.fields(Params):
        keys = {f.name for f in dataclasses.fields(section.default_factory())}
        assert set(raw[section.name]) == keys, section.name


# ---------------------------------------------------------------- the code that runs


MARKER = '''
import os as _os, pathlib as _pathlib
if _os.environ.get("DDPM_MARKER_DIR"):
    (_pathlib.Path(_os.environ["DDPM_MARKER_DIR"]) / f"ran-{_os.getpid()}").write_text(__file__)
'''


def test_stages_run_their_own_checkout_of_the_library(tmp_path):
    """The environment's ddpm is installed from this checkout; the project's copy of src/
    differs (a marker in ddpm/__init__.py). `dvc repro` and `dvc exp run --temp` (which
    runs in a copy under .dvc/tmp/exps/) must both run the project's copy."""
    root = make_dvc_project(tmp_path / "project",
                            {"data": {"source": "synthetic", "synthetic_count": 4}})
    init = root / "src" / "ddpm" / "__init__.py"
    init.write_text(init.read_text() + MARKER)
    subprocess.run(["git", "commit", "-qam", "marker"], cwd=root, check=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    import ddpm

    assert Path(ddpm.__file__).resolve().is_relative_to(REPO)  # the installed library
    marks = tmp_path / "marks"
    marks.mkdir()
    os.environ["DDPM_MARKER_DIR"] = str(marks)
    try:
        dvc("repro", "download", cwd=root)
        ran = [Path(p.read_text()) for p in marks.iterdir()]
        assert ran and all(p == init for p in ran), ran
        for p in marks.iterdir():
            p.unlink()
        dvc("exp", "run", "--temp", "download", "-S", "data.synthetic_count=6", cwd=root)
        ran = [Path(p.read_text()) for p in marks.iterdir()]
        temp = root / ".dvc" / "tmp" / "exps"
        assert ran and all(p.is_relative_to(temp) and p.name == "__init__.py" for p in ran), ran
    finally:
        del os.environ["DDPM_MARKER_DIR"]


def test_the_demo_project_runs_its_own_copy(tmp_path):
    from ddpm.tools.demo import prepare

    out = tmp_path / "demo"
    prepare(out, REPO, REPO / "params.yaml")
    init = out / "src" / "ddpm" / "__init__.py"
    init.write_text(init.read_text() + MARKER)
    marks = tmp_path / "marks"
    marks.mkdir()
    subprocess.run([sys.executable, "stages/download.py", "--help"], cwd=out, check=True,
                   capture_output=True, env={**os.environ, "DDPM_MARKER_DIR": str(marks)})
    assert [Path(p.read_text()) for p in marks.iterdir()] == [init]
