"""The tree shows the pipeline: one subpackage per part, lower parts never import higher
ones, and the core imports only what runs wherever torch does."""

import subprocess
import sys

from conftest import REPO
from ddpm.lineage import imported_modules

LIBRARY = REPO / "src" / "ddpm"
# The parts, lowest first: a module may import its own part and the ones before it.
PARTS = ("core", "data", "model", "evaluate", "tracking", "train", "tools")
CORE = {"__init__.py", "config.py", "atomic.py", "device.py", "stageutil.py", "lineage.py"}


def part_of(path):
    rel = path.relative_to(LIBRARY)
    return rel.parts[0] if len(rel.parts) > 1 else "core"


def test_the_library_is_its_parts_and_nothing_else_at_the_top():
    assert {p.name for p in LIBRARY.glob("*.py")} == CORE
    assert {p.name for p in LIBRARY.iterdir() if p.is_dir() and p.name != "__pycache__"} == \
        set(PARTS) - {"core"}
    for part in set(PARTS) - {"core"}:
        assert (LIBRARY / part / "__init__.py").read_text().startswith('"""'), part


def test_lower_parts_never_import_higher_ones():
    wrong = []
    for module in sorted(LIBRARY.rglob("*.py")):
        rank = PARTS.index(part_of(module))
        for target in imported_modules(module, REPO):
            if PARTS.index(part_of(target)) > rank:
                wrong.append(f"{module.relative_to(LIBRARY)} imports {target.relative_to(LIBRARY)}")
    assert wrong == []


BLOCKER = """
import importlib.abc, sys
BLOCKED = {"mlflow", "dvc", "kaggle", "tqdm", "yaml"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path.insert(0, %r)
"""


def run_blocked(code):
    return subprocess.run([sys.executable, "-c", BLOCKER % str(REPO / "src") + code],
                          capture_output=True, text=True, timeout=120)


def test_the_model_runs_with_torch_and_numpy_alone():
    done = run_blocked("""
import torch
from ddpm.model import UNet, make_schedule, to_model, to_uint8, SAMPLERS
from ddpm.config import ModelConfig, DiffusionConfig
model = UNet(ModelConfig(channels=(32, 64), attention=(False, True), blocks_per_level=1))
x = to_model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
assert model(x, torch.tensor([0, 5])).shape == x.shape
assert make_schedule(DiffusionConfig(steps=10)).T == 10
assert "PIL" not in sys.modules and "scipy" not in sys.modules, "the model imports more"
print("ok")
""")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_decoding_runs_with_pillow_and_numpy_alone():
    done = run_blocked("""
from ddpm.data.preprocess import preprocess
from ddpm.data.processed import load_processed
assert "torch" not in sys.modules, "decoding imports torch"
print("ok")
""")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_blocker_blocks():
    """The two tests above would pass vacuously if the blocker let yaml through."""
    done = run_blocked("import yaml")
    assert done.returncode != 0 and "yaml is blocked" in done.stderr
