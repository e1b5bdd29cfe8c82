"""The docs site (issue 24): the reference generated from the code (docs/hooks.py) covers every config key, command,
registry tag and event, fails on an undocumented one, and the whole site builds offline with ``--strict``."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from tuneflow import registry_base, watch
from tuneflow.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("tuneflow_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        sub = hooks._section_of(field.annotation)
        if sub is not None:
            out += _keys(sub, f"{prefix}{name}.")
    return out


def test_every_config_field_has_a_description():
    assert hooks.undocumented_fields() == [], "give each a Field(description=...) in src/tuneflow/config.py"


def test_the_severity_description_names_every_check_that_must_stay_error():
    from tuneflow.config import ESSENTIAL_CHECKS

    description = PipelineConfig.model_fields["validation"].annotation.model_fields["severity"].description
    assert ESSENTIAL_CHECKS and all(name in description for name in ESSENTIAL_CHECKS)


def test_a_field_without_a_description_is_found_and_fails_the_reference():
    class Inner(BaseModel):
        documented: int = Field(1, description="has one")
        bare: int = 2

    class Outer(BaseModel):
        inner: Inner = Field(Inner(), description="a section")
        section_without: Inner = Inner()

    assert hooks.undocumented_fields(Outer) == ["section_without", "inner.bare", "section_without.bare"]


def test_the_config_reference_has_every_key_with_its_type_default_and_constraints():
    page = hooks.config_reference()
    rows = {
        m.group(1): m.group(0) for m in re.finditer(r"^\| \[?`([a-z0-9_.]+)`(?:\]\(#[a-z0-9_-]+\))? \|.*$", page, re.M)
    }
    keys = _keys(PipelineConfig)
    assert len(keys) > 80
    assert sorted(rows) == sorted(keys)
    # type, default, constraints and description as the model declares them
    assert rows["train.processes"].split(" | ")[1:4] == ["int", "`1`", "≥ 1, ≤ 1024"]
    assert rows["data.eval_fraction"].split(" | ")[1:4] == ["float", "`0.2`", "> 0.0, &lt; 1.0"]
    assert "**required**" in rows["registry.model_name"]
    # what changes the config digest (and so makes an unchanged run retrain) and what does not
    assert (
        "Not in the config digest" in rows["train.processes"] and "Not in the config digest" not in rows["train.epochs"]
    )
    assert "`new_data` / `degraded`" in rows["monitor.retrain_when"]
    assert PipelineConfig.model_fields["kind"].description.split(":")[0] in rows["kind"]
    for section in ("data", "validation", "train", "sft.lora", "monitor"):
        assert f"\n## {section}\n" in page


def test_the_cli_reference_has_every_command_and_its_options():
    from tuneflow.cli import _parser

    page = hooks.cli_reference()
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert len(sub.choices) >= 12
    for name, parser in sub.choices.items():
        assert f"\n## {name}\n" in page, name
        assert f"usage: tuneflow {name}" in page, name
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)


def test_the_registry_reference_has_every_alias_and_tag_constant():
    page = hooks.registry_reference()
    tags = {v for k, v in vars(registry_base).items() if k.endswith("_TAG") and isinstance(v, str)}
    assert len(tags) >= 17
    for value in tags | {registry_base.CHAMPION, registry_base.CHALLENGER}:
        assert f"`{value}`" in page, value
    assert "`tuneflow.history.`" in page and "`tuneflow.monitor_reference`" in page


def test_a_tag_constant_without_a_comment_fails_the_reference(tmp_path):
    module = tmp_path / "names.py"
    module.write_text(
        'A_TAG = "tuneflow.a"  # what a holds\n# what b holds\nB_TAG = "tuneflow.b"\nC_TAG = "tuneflow.c"\n'
    )
    assert hooks.commented_constants(module, ("_TAG",)) == [
        ("A_TAG", "tuneflow.a", "what a holds"),
        ("B_TAG", "tuneflow.b", "what b holds"),
        ("C_TAG", "tuneflow.c", ""),
    ]
    old = dict(hooks.TAG_MODULES)
    try:
        hooks.TAG_MODULES.clear()
        hooks.TAG_MODULES[str(module)] = "somewhere"  # an absolute path: SRC / it is the path itself
        with pytest.raises(hooks.DocsError, match="C_TAG .* has no comment"):
            hooks.registry_reference()
    finally:
        hooks.TAG_MODULES.clear()
        hooks.TAG_MODULES.update(old)


def test_the_events_reference_has_every_event_and_resource():
    page = hooks.events_reference()
    for value in (watch.EVENT, watch.QUARANTINED_EVENT, watch.DEGRADED_EVENT):
        assert f"`{value}`" in page
    assert "`tuneflow.dataset.<name>`" in page and "`tuneflow.model.<model>`" in page


# What the README held before it became the front page (issue 24): each of its sections is a page or a heading of
# the site now. The generated reference replaces the hand-kept "CLI" and "Configuration" tables.
README_SECTIONS = {
    "Two commands": "get-started/index.md",
    "What a run prints and produces": "get-started/index.md",
    "Review models": "how-to/promote-rollback.md",
    "Model card, promotion, rollback": "how-to/promote-rollback.md",
    "Use the champion": "how-to/serving.md",
    "Serve the champion": "how-to/serving.md",
    "What tuneflow loads from the registry": "how-to/serving.md",
    "Command line": "reference/cli.md",
    "Data and the landing zone": "concepts/landing-zone.md",
    "Landing zone": "concepts/landing-zone.md",
    "Validation and reports": "concepts/validation.md",
    "Lineage": "concepts/fingerprint.md",
    "Configuration": "reference/config.md",
    "A killed retrain resumes": "concepts/fingerprint.md",
    "Training in several processes (train.processes)": "how-to/multi-process.md",
    "Nothing changed, nothing trained": "concepts/fingerprint.md",
    "Promotion gate": "concepts/champion-challenger.md",
    "Monitoring: when to retrain": "how-to/monitoring.md",
    "Schedules and data triggers": "how-to/schedules.md",
    "Alerts": "how-to/alerts.md",
    "Generative fine-tuning (kind sft)": "how-to/sft.md",
    "Local and team mode": "how-to/team-mode.md",
    "Team mode, step by step": "how-to/team-mode.md",
    "Benchmark: tuneflow vs the Trainer recipe it replaces": "benchmarks/index.md",
    "Benchmark: wall time of `make run`": "benchmarks/index.md",
    "Tests": "development/tests.md",
    "Layout": "development/layout.md",
    "Adding a kind of fine-tuning": "development/adding-a-kind.md",
}


def test_every_section_moved_out_of_the_readme_is_a_page_of_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    for title, page in README_SECTIONS.items():
        text = hooks.PAGES[page]() if page in hooks.PAGES else (ROOT / "docs" / page).read_text()
        assert re.search(rf"^#+ {re.escape(title)}$", text, re.M), (title, page)
        assert f" {page}\n" in nav or f"- {page}\n" in nav, f"{page} is not in mkdocs.yml's nav"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_site_builds_offline_and_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: make setup-dev installs it")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    config_page = (site / "reference" / "config" / "index.html").read_text()
    assert "train.processes" in config_page and "<table>" in config_page
    # nothing fetched from elsewhere when a page is opened: no script, stylesheet or font from another host
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(https?:)?//", text), page
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, page
