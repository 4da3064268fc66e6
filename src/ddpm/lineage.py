"""Which code a stage runs, derived from the code itself: the one definition that the train
stage's resume rule and `tests/test_lineage.py` (each stage's dvc.yaml deps) both use.

A stage script's *import closure* is every library file it reaches through imports,
directly or through other library files, lazy imports inside functions included
(read from the source with `ast`, nothing is imported). `NOT_DEPS` lists the files in
such a closure that cannot change a cached output, with the reason; everything else is
code whose edit must rerun the stage (DVC) and must not be resumed across (a checkpoint
records `code_digest` of the train stage's closure).

Standard library only: it reads files.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent  # src/ddpm, the checkout that is running
REPO = LIBRARY.parents[1]

# Files a stage imports that cannot change a cached output, and why.
NOT_DEPS = {  # besides package __init__ files that are only a docstring (`_inert`)
    "src/ddpm/stageutil.py": "stage plumbing: argument parsing, printing, one-line error exits",
    "src/ddpm/config.py": "parses and checks params.yaml; the values are DVC params, and every "
                          "key is in params.yaml (test_params_yaml_sets_every_key), so no "
                          "default written in config.py reaches a stage",
    "src/ddpm/atomic.py": "how files are written (temporary name, rename, mode), not what",
    "src/ddpm/lineage.py": "reads source files to name the code; computes nothing a stage writes",
}
# Folders whose every file is excused, and why.
NOT_DEPS_FOLDERS = {
    "src/ddpm/tracking": "sends to MLflow; the run files it writes hold run ids, which differ "
                         "on every run anyway",
}


def excused(rel: str) -> bool:
    """Whether a repository-relative file cannot change a cached output (NOT_DEPS)."""
    return rel in NOT_DEPS or any(rel.startswith(f"{folder}/") for folder in NOT_DEPS_FOLDERS)


def _module_file(name: str, root: Path) -> Path | None:
    """src/ddpm/<name>.py (or a package's __init__) for a dotted `ddpm...` name."""
    parts = name.split(".")
    if parts[0] != "ddpm":
        return None
    base = root / "src" / Path(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path = REPO) -> set[Path]:
    """The library files `path` imports anywhere in its body (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    library = root / "src" / "ddpm"
    package: tuple[str, ...] = ()  # the package a relative import starts from
    if path.is_relative_to(library):
        parts = path.relative_to(root / "src").with_suffix("").parts
        package = parts if path.name == "__init__.py" else parts[:-1]
        package = tuple(p for p in package if p != "__init__")
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: only inside the library
                anchor = ".".join(package[:len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            # `from ddpm import atomic` names a module; `from ddpm.x import y` a name in x
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            file = _module_file(name, root) if name else None
            if file is not None:
                found.add(file)
                # Importing ddpm.a.b runs the __init__ of ddpm and of ddpm.a first.
                found.update(p / "__init__.py" for p in file.parents
                             if p.is_relative_to(library) and (p / "__init__.py") != file)
    return found


def import_closure(script: Path, root: Path = REPO) -> set[str]:
    """Every library file `script` reaches through imports, as repository-relative paths."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for file in imported_modules(todo.pop(), root):
            if file not in seen:
                seen.add(file)
                todo.append(file)
    return {p.relative_to(root).as_posix() for p in seen}


def as_deps(files: list[str], root: Path = REPO) -> list[str]:
    """`files` as dvc.yaml lists them: a library folder all of whose code is among them as
    the folder, the rest as files."""
    wanted, out = set(files), set(files)
    folders = sorted({p for f in wanted for p in Path(f).parents
                      if p.is_relative_to("src/ddpm") and p != Path("src/ddpm")},
                     key=lambda p: len(p.parts))
    for folder in folders:  # the widest first: a whole subpackage covers its subfolders
        if any(Path(d) in folder.parents for d in out if not d.endswith(".py")):
            continue
        modules = folder_code(folder, root)
        if modules <= wanted:
            out = (out - modules) | {folder.as_posix()}
    return sorted(out)


def folder_code(folder: str | Path, root: Path = REPO) -> set[str]:
    """The code files a folder dep covers: its modules, less docstring-only __init__ files
    and NOT_DEPS."""
    return {rel for p in sorted((root / folder).rglob("*.py"))
            if not excused(rel := p.relative_to(root).as_posix()) and not _inert(p)}


def expand_deps(deps: list[str], root: Path = REPO) -> set[str]:
    """The code files a list of dvc.yaml deps covers (a folder: `folder_code`)."""
    out: set[str] = set()
    for dep in deps:
        if (root / dep).is_dir():
            out |= folder_code(dep, root)
        elif dep.endswith(".py"):
            out.add(dep)
    return out


def _inert(path: Path) -> bool:
    """A package __init__ that is only a docstring (and a version string): running it
    changes nothing."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
               or isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
               for node in body)


def stage_code(script: Path, root: Path = REPO) -> list[str]:
    """The files whose edit can change what `script` writes: the script and its import
    closure, minus NOT_DEPS; sorted repository-relative paths (a stage's code deps)."""
    script = Path(script).resolve()
    code = {p for p in import_closure(script, root) if not excused(p) and not _inert(root / p)}
    return sorted({script.relative_to(root).as_posix()} | code)


def code_digest(script: Path, root: Path = REPO) -> dict[str, str]:
    """{path: SHA-256 of its bytes} for `stage_code(script)`: what a checkpoint records, so
    that a resume compares the code that made it with the code that runs."""
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
            for rel in stage_code(script, root)}


def code_differences(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """The files that differ between two code digests: changed, added or removed."""
    changed = [p for p in sorted(set(saved) & set(current)) if saved[p] != current[p]]
    added = sorted(set(current) - set(saved))
    removed = sorted(set(saved) - set(current))
    return ([f"{p} changed" for p in changed] + [f"{p} is new" for p in added]
            + [f"{p} is gone" for p in removed])
