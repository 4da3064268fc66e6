"""The docs cannot drift from the code: every params.yaml key is on the parameters page with
its default, every relative link and #anchor resolves, every repository path the docs name
in backticks exists, and the README's commands are Makefile targets. Text only: no torch,
no subprocess."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]


def prose(text: str) -> str:
    """The text without fenced code blocks (links and headings there are not markdown's)."""
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)


def without_code_spans(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation other
    than '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor; repeats get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(page.read_text()), re.M):
        base = slug(match[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    targets = []
    for line in prose(page.read_text()).splitlines():
        targets += re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code_spans(line))
    return targets


def params_keys(raw: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in raw.items()
            for key, value in (values or {}).items()}


def documented_defaults() -> dict[str, str]:
    """{key: default cell} from the parameters page's tables (`| `key` | `default` | ...`)."""
    rows = {}
    for line in (REPO / "docs" / "parameters.md").read_text().splitlines():
        match = re.match(r"^\|\s*`([a-z_]+\.[a-z_]+)`\s*\|\s*(.*?)\s*\|", line)
        if match:
            assert match[1] not in rows, f"{match[1]} is documented twice"
            rows[match[1]] = match[2]
    return rows


def test_the_docs_exist_and_the_readme_stays_short():
    assert DOCS, "docs/ has no pages"
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_params_key_is_on_the_parameters_page_with_its_default():
    params = params_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    rows = documented_defaults()
    missing = sorted(set(params) - set(rows))
    assert not missing, f"docs/parameters.md lacks {missing}"
    unknown = sorted(set(rows) - set(params))
    assert not unknown, f"docs/parameters.md documents keys params.yaml lacks: {unknown}"
    for key, value in params.items():
        cell = rows[key]
        code = re.fullmatch(r"`([^`]*)`", cell)
        assert code, f"docs/parameters.md: {key}'s default must be one `code` span, got {cell!r}"
        documented = yaml.safe_load(code[1])
        assert documented == value and type(documented) is type(value), \
            f"docs/parameters.md: {key} defaults to {documented!r}, params.yaml to {value!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not markdown")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


REPO_PATH = re.compile(r"`((?:src|stages|scripts|tests|plots|docs)/[\w./-]+)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_file_the_docs_name_exists(page):
    named = set(REPO_PATH.findall(page.read_text()))
    missing = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


def test_the_readme_commands_are_makefile_targets():
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (REPO / "Makefile").read_text(),
                             re.M))
    readme = (REPO / "README.md").read_text()
    used = set(re.findall(r"\bmake ([a-z][\w-]*)", readme))
    assert {"demo", "test"} <= used, "the README's two commands are make demo and make test"
    assert used <= targets, f"README.md runs make targets the Makefile lacks: {used - targets}"


def test_the_slugs_are_githubs():
    assert slug("FID while training") == "fid-while-training"
    assert slug("The seed's model") == "the-seeds-model"
    assert slug("Speed, GPUs and multi-GPU") == "speed-gpus-and-multi-gpu"
    assert slug("`train.fid_every` and the curve") == "trainfid_every-and-the-curve"
    assert slug("DDPM → DDIM") == "ddpm--ddim"
