"""The README and docs/ are followed literally by newcomers: every `python -m` command they show
must exist with the flags shown, every relative link must lead to a file and heading that
exist, and the README stays a front door rather than the reference."""
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m ([a-z_]+(?:\.[a-z_]+)*)([^`\n|;)]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def shown_commands():
    """(page, module, flags) for every `python -m MODULE ...` written in the pages."""
    for page in PAGES:
        for match in COMMAND.finditer(page.read_text(encoding="utf-8")):
            yield page.name, match.group(1), FLAG.findall(match.group(2))


def option_strings(module: str) -> set:
    entry = importlib.import_module(module if module.count(".") else f"{module}.__main__")
    if not hasattr(entry, "get_args_parser"):  # e.g. `python -m heads`, which only names the commands
        return set()
    return {option for action in entry.get_args_parser()._actions for option in action.option_strings}


def heading_anchors(page: Path) -> set:
    """GitHub's anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines()
                if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_command_shown_exists_with_the_flags_shown():
    unknown = []
    for page, module, flags in shown_commands():
        known = option_strings(module)
        unknown += [f"{page}: python -m {module} {flag}" for flag in flags if flag not in known]
    assert not unknown, "flags the pages show but the commands do not take:\n" + "\n".join(unknown)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = []
    for link in LINK.findall(page.read_text(encoding="utf-8")):
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(link)
        elif anchor and anchor not in heading_anchors(path):
            broken.append(link)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_readme_stays_a_front_door():
    assert len((REPO / "README.md").read_bytes()) < 12_000, "reference material belongs in docs/"
