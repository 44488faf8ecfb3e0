"""Where agents look for the skill, and what a bare copy of it can do.

- Claude Code: `.claude-plugin/marketplace.json` and the plugin manifest it points to, checked against the
  fields Claude Code documents (`/plugin marketplace add <repo>`, `/plugin install mechscope@mechscope`);
  the plugin root's `skills/mechscope/` is the skill it installs.
- Codex and other agents that read `.agents/skills/`: `.agents/skills/mechscope` resolves to the same skill.
- `agentskills validate` (the skills-ref package) passes on the skill folder.
- A bare copy of the skill folder (links followed): its first command works with no install at all, and
  the next one says in one line how to install (exit 2).
- pyproject's license is an SPDX string (the TOML-table form prints a deprecation warning on every build).
"""
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKILL = ROOT / "skills" / "mechscope"
KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$")
# the documented fields (Claude Code plugin marketplace and plugin manifest references)
MARKETPLACE_FIELDS = {"$schema", "name", "owner", "plugins", "metadata", "description", "version"}
METADATA_FIELDS = {"description", "version", "pluginRoot"}
PLUGIN_ENTRY_FIELDS = {"name", "source", "description", "version", "author", "homepage", "repository", "license",
                       "keywords", "category", "tags", "strict", "commands", "agents", "skills", "hooks",
                       "mcpServers", "lspServers"}
PLUGIN_FIELDS = {"name", "version", "description", "author", "homepage", "repository", "license", "keywords",
                 "commands", "agents", "skills", "hooks", "mcpServers", "outputStyles", "lspServers"}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def frontmatter(path: Path) -> dict:
    head = path.read_text().split("---", 2)[1]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in head.strip().splitlines())}


def test_marketplace_lists_the_plugin_with_documented_fields():
    market = json.loads((ROOT / ".claude-plugin" / "marketplace.json").read_text())
    assert set(market) <= MARKETPLACE_FIELDS and {"name", "owner", "plugins"} <= set(market)
    assert KEBAB.match(market["name"]) and isinstance(market["owner"], dict) and market["owner"]["name"]
    assert set(market.get("metadata", {})) <= METADATA_FIELDS
    (entry,) = market["plugins"]
    assert set(entry) <= PLUGIN_ENTRY_FIELDS and {"name", "source"} <= set(entry)
    assert KEBAB.match(entry["name"]) and entry["name"] == "mechscope"
    assert isinstance(entry["source"], str) and entry["source"].startswith("./")   # a path inside the repo
    assert entry.get("version", VERSION) == VERSION == market["metadata"]["version"]
    assert (ROOT / entry["source"]).resolve() == ROOT


def test_plugin_manifest_has_documented_fields_and_carries_the_skill():
    market = json.loads((ROOT / ".claude-plugin" / "marketplace.json").read_text())
    plugin_root = (ROOT / market["plugins"][0]["source"]).resolve()
    manifest = json.loads((plugin_root / ".claude-plugin" / "plugin.json").read_text())
    assert set(manifest) <= PLUGIN_FIELDS and manifest["name"] == market["plugins"][0]["name"]
    assert SEMVER.match(manifest["version"]) and manifest["version"] == VERSION
    assert isinstance(manifest["description"], str) and isinstance(manifest["author"], dict) and manifest["author"]["name"]
    # Claude Code finds a plugin's skills in <plugin root>/skills/<name>/SKILL.md
    skills = sorted(p.parent.name for p in (plugin_root / "skills").glob("*/SKILL.md"))
    assert skills == ["mechscope"] and frontmatter(plugin_root / "skills/mechscope/SKILL.md")["name"] == "mechscope"


def test_the_skill_folder_is_the_repository_skill():
    """skills/mechscope/ links to the top-level files, so there is one SKILL.md and one references/."""
    for name in ("SKILL.md", "references", "scripts", "templates", "src", "pyproject.toml", "MODEL_CARD.md",
                 "SAE_CARD.md", "BENCHMARKS.md"):
        link = SKILL / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), name
    codex = ROOT / ".agents" / "skills" / "mechscope"
    assert codex.resolve() == SKILL.resolve() and (codex / "SKILL.md").read_text() == (ROOT / "SKILL.md").read_text()
    agents = (ROOT / "AGENTS.md").read_text()
    assert "SKILL.md" in agents and ".agents/skills/mechscope" in agents
    readme = (ROOT / "README.md").read_text()
    for path in ("/plugin marketplace add", "/plugin install mechscope@mechscope", ".agents/skills/mechscope",
                 "pip install -e"):
        assert path in readme, path


def test_agentskills_validate_passes_on_the_skill_folder():
    cli = shutil.which("agentskills") or str(Path(sys.executable).with_name("agentskills"))
    if not Path(cli).exists():
        pytest.skip("skills-ref is not installed (pip install skills-ref; it is in the [test] extra)")
    for folder in (SKILL, ROOT / ".agents" / "skills" / "mechscope"):
        done = subprocess.run([cli, "validate", str(folder)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Valid skill" in done.stdout, done.stdout + done.stderr


@pytest.fixture(scope="module")
def bare_copy(tmp_path_factory):
    """The skill folder copied with its links followed, as an agent's skill installer leaves it."""
    target = tmp_path_factory.mktemp("bare") / "mechscope"
    shutil.copytree(SKILL, target, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def test_a_bare_copy_runs_its_first_command_with_no_install(bare_copy):
    """`python3 scripts/detect_compute.py --json` with no site-packages at all (-I -S): stdlib only."""
    done = subprocess.run([sys.executable, "-I", "-S", "scripts/detect_compute.py", "--json"], cwd=bare_copy,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["command"] == "detect" and out["summary"]["hardware"]["cpu_cores"] >= 1
    assert out["summary"]["libraries"]["torch"] is None           # proof that nothing installed was used
    assert any(m["model"] == "mechscope-toy" for m in out["summary"]["models"])
    # the same engine the installed package is advised (transformer-lens < 4 comes with it): tl, not bridge
    assert {m["backend"] for m in out["summary"]["models"] if m["library"] == "transformer-lens"} == {"tl"}


def test_every_document_the_skill_points_to_is_in_the_bare_copy(bare_copy):
    """SKILL.md, the references and the commands' help name top-level documents (MODEL_CARD.md, SAE_CARD.md,
    BENCHMARKS.md...): an installed skill folder must hold each one (SAE_CARD.md and BENCHMARKS.md were missing)."""
    texts = [bare_copy / "SKILL.md", *(bare_copy / "references").glob("*.md"),
             *(bare_copy / "src/mechscope/commands").glob("*.py")]
    named = {m for path in texts for m in re.findall(r"\b[A-Z][A-Z_]+\.md\b", path.read_text())}
    named -= {"CLAUDE.md", "AGENTS.md", "FILE.md"}   # the study's guides (mechscope new); report's --notes metavar
    assert {"MODEL_CARD.md", "SAE_CARD.md", "BENCHMARKS.md"} <= named
    for name in named:
        assert (bare_copy / name).is_file() and (bare_copy / name).read_text() == (ROOT / name).read_text(), name


def test_a_bare_copy_says_how_to_install_for_the_next_command(bare_copy):
    done = subprocess.run([sys.executable, "-I", "-S", "scripts/heads.py", "--json"], cwd=bare_copy,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert f"python3 -m pip install -e {bare_copy}" in done.stderr and "torch is not installed" in done.stderr


def test_license_is_an_spdx_string_and_the_build_does_not_warn(tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    build = subprocess.run([sys.executable, "-W", "always", "-c",
                            "import sys; from setuptools import build_meta as b; "
                            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    if build.returncode != 0 and "setuptools" in build.stderr and "ModuleNotFoundError" in build.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert build.returncode == 0, build.stderr[-2000:]
    assert "license" not in build.stderr.lower(), build.stderr[-2000:]
    metadata = next(tmp_path.glob("*.dist-info")).joinpath("METADATA").read_text()
    assert "License-Expression: MIT" in metadata
