"""The generated reference of the docs site: a MkDocs hook (``hooks:`` in mkdocs.yml) that writes, at build time,

    reference/config.md     every config key: type, default, constraints, description (tuneflow.config's models)
    reference/cli.md        every command's ``--help`` (tuneflow.cli's argparse parser)
    reference/registry.md   the aliases and every ``tuneflow.*`` tag (the ``*_TAG`` constants and their comments)
    reference/events.md     the Prefect events tuneflow emits (the ``*_EVENT`` constants of tuneflow.watch)

The pages exist only in the build (``File.generated``): nothing generated is committed, so nothing can go stale.
A config field without a description, or a tag or event constant without a comment, fails the build (and
tests/test_docs.py). The functions below return markdown and need no MkDocs: the tests call them directly.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import types
import typing
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tuneflow"

# Where the registry's names are declared, and what the tags of each module sit on.
TAG_MODULES = {
    "registry_base.py": "a registered version (or, for aliases, the registered model)",
    "reference.py": "a registered version",
    "history.py": "the registered model",
    "tracking.py": "a retrain's MLflow runs (parent run; lineage tags are copied to the version)",
    "monitor.py": "the model's monitoring run (`monitor-<model>`)",
}


class DocsError(ValueError):
    """Something the generated reference needs is missing from the code (a description, a comment)."""


# ---------------------------------------------------------------------------------------------------- config keys


def _type(annotation: Any) -> str:
    """A type as a reader of the YAML sees it: ``int``, ``'csv' / 'jsonl'``, ``list[str]``, ``float or unset``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or unset" if type(None) in args else "")
    if origin in (list, tuple, set):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"map {_type(args[0])} → {_type(args[1])}" if args else "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return _value(field.default_factory())
    if field.default is PydanticUndefined:
        return "**required**"
    return _value(field.default)


_BOUNDS = {
    annotated_types.Ge: ("≥", "ge"),
    annotated_types.Gt: (">", "gt"),
    annotated_types.Le: ("≤", "le"),
    annotated_types.Lt: ("<", "lt"),
}


def _constraints(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for kind, (sign, attr) in _BOUNDS.items():
            if isinstance(m, kind):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen):
            out.append(f"at least {m.min_length} long")
        if isinstance(m, annotated_types.MaxLen):
            out.append(f"at most {m.max_length} long")
    return ", ".join(out)


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``TrainConfig``, ``ScheduleConfig | None``), else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def config_sections(
    model: type[BaseModel] | None = None, prefix: str = "", description: str = ""
) -> list[tuple[str, str, type[BaseModel]]]:
    """(dotted prefix, the section's description, model) of the top level and every section, depth first."""
    if model is None:
        from tuneflow.config import PipelineConfig

        model = PipelineConfig
    out = [(prefix, description, model)]
    for name, field in model.model_fields.items():
        sub = _section_of(field.annotation)
        if sub is not None:
            out.extend(config_sections(sub, f"{prefix}{name}.", field.description or ""))
    return out


def undocumented_fields(model: type[BaseModel] | None = None) -> list[str]:
    """Every config key (dotted) whose pydantic field has no description (of ``model``, default PipelineConfig)."""
    missing = []
    for prefix, _, section in config_sections(model):
        for name, field in section.model_fields.items():
            if not (field.description or "").strip():
                missing.append(prefix + name)
    return missing


def _cell(text: str) -> str:
    """One table cell: on one line, ``|`` escaped, ``<`` escaped outside code spans (``<landing>`` is no tag)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def config_reference() -> str:
    missing = undocumented_fields()
    if missing:
        raise DocsError(
            f"config fields without a description: {', '.join(missing)}. "
            "Fix: give each a Field(description=...) in src/tuneflow/config.py"
        )
    lines = [
        "# Configuration",
        "",
        "One typed pydantic `PipelineConfig` (`tuneflow.config`) per use case, in `configs/*.yaml`; the flow takes",
        "it as its parameter, so the Prefect UI shows it as a form. An unknown key, a wrong type or an impossible",
        "combination fails before any work, with the fix:",
        "",
        "```",
        "error: invalid config configs/sms-spam.yaml:",
        "  - train.epoch: unknown key. Fix: did you mean 'epochs'? remove it or use one of: epochs, batch_size, …",
        "```",
        "",
        "`tuneflow run --set KEY=VALUE` overrides any key below (the value is parsed as YAML), e.g.",
        "`--set train.epochs=1 --set data.path=new.csv`.",
        "",
        '!!! note "Generated"',
        "    This page is generated from the pydantic models in `src/tuneflow/config.py` when the site is built",
        "    (`docs/hooks.py`): type, default, constraints and description are the code's own.",
        "",
    ]
    from tuneflow.config import NOT_IN_DIGEST

    lines += [
        "A key marked *not in the config digest* (`NOT_IN_DIGEST` in `tuneflow.config`) changes when or how a run",
        "works, not what it trains: editing it does not make the next run on unchanged data retrain",
        "([Fingerprint and freshness](../concepts/fingerprint.md)).",
        "",
    ]
    for prefix, description, model in config_sections():
        title = prefix.rstrip(".") or "top level"
        lines += [f"## {title}", ""]
        whole = NOT_IN_DIGEST.get(prefix.rstrip(".")) is True
        if description:
            lines += [_cell(description) + (" *Not in the config digest.*" if whole else ""), ""]
        fields = NOT_IN_DIGEST.get(prefix.rstrip("."), set()) if prefix else set()
        fields = set() if fields is True else fields
        lines += ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = f"`{prefix}{name}`"
            if _section_of(field.annotation) is not None:  # a section: its key links to its own table
                key = f"[{key}](#{re.sub(r'[^a-z0-9_-]', '', (prefix + name).lower())})"
            lines.append(
                f"| {key} | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
                f"{_cell(_constraints(field))} | {_cell(field.description or '')}"
                + (" *Not in the config digest.*" if name in fields else "")
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- CLI


def cli_commands() -> dict[str, tuple[str, str]]:
    """{command: (one-line help, full --help text)} from tuneflow.cli's parser, in the parser's order."""
    from tuneflow.cli import _parser

    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal: a fixed width, the same page on every build
    parser = _parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    out = {"tuneflow": ("", parser.format_help())}
    for name, p in sub.choices.items():
        out[name] = (helps.get(name, ""), p.format_help())
    return out


def cli_reference() -> str:
    commands = cli_commands()
    lines = [
        "# Command line",
        "",
        "`tuneflow COMMAND ...`; `python -m tuneflow` works exactly like `tuneflow` (same commands, options and exit",
        "codes). Exit code 2 means the input (config, data, or a registry request such as a rollback with nothing to",
        "go back to) was rejected: the message says what to fix, and nothing was trained, registered or moved.",
        "",
        '!!! note "Generated"',
        "    This page is each command's `--help`, taken from the parser in `src/tuneflow/cli.py` when the site is",
        "    built (`docs/hooks.py`).",
        "",
        "| command | does |",
        "|---|---|",
    ]
    lines += [f"| [`{n}`](#{n}) | {_cell(h)} |" for n, (h, _) in commands.items() if n != "tuneflow"]
    lines.append("")
    for name, (_, text) in commands.items():
        lines += [f"## {name}" if name != "tuneflow" else "## tuneflow --help", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- constants and their comments


def commented_constants(path: Path, suffixes: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(name, value, comment) of the module-level string constants of ``path`` whose name ends with one of
    ``suffixes``; the comment is the one at the end of the line, or the comment lines just above."""
    source = path.read_text()
    lines = source.splitlines()
    out = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            pairs = list(zip(target.elts, value.elts, strict=True))
        else:
            pairs = [(target, value)]
        for t, v in pairs:
            if not (isinstance(t, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, str)):
                continue
            if not t.id.endswith(suffixes):
                continue
            line = lines[node.lineno - 1]
            comment = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            if not comment:
                above, i = [], node.lineno - 2
                while i >= 0 and lines[i].lstrip().startswith("#"):
                    above.insert(0, lines[i].lstrip()[1:].strip())
                    i -= 1
                comment = " ".join(above)
            out.append((t.id, v.value, comment))
    return out


def registry_reference() -> str:
    rows = []
    for module, on in TAG_MODULES.items():
        for name, value, comment in commented_constants(SRC / module, ("_TAG", "CHAMPION", "CHALLENGER")):
            if value == "tuneflow.":
                continue
            if not comment:
                raise DocsError(f"{name} in src/tuneflow/{module} has no comment. Fix: say what it holds, after it")
            rows.append((name, value, module, on, comment))
    aliases = [r for r in rows if not r[1].startswith("tuneflow.")]
    tags = [r for r in rows if r[1].startswith("tuneflow.")]
    from tuneflow.registry_base import REQUIREMENT_PACKAGES

    lines = [
        "# Registry contract",
        "",
        "What tuneflow writes into the MLflow registry and runs, and what it reads back: the aliases it moves and",
        "every `tuneflow.*` tag. Anything that reads the registry (a dashboard, another team's job, a review",
        "script) may rely on these names.",
        "",
        '!!! note "Generated"',
        "    From the constants in `src/tuneflow/` (" + ", ".join(f"`{m}`" for m in TAG_MODULES) + ") and the comment",
        "    beside each, when the site is built (`docs/hooks.py`).",
        "",
        "## Aliases",
        "",
        "| alias | constant | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{v}` | `{n}` ({m}) | {_cell(c)} |" for n, v, m, _, c in aliases]
    lines += [
        "",
        "## Tags",
        "",
        "A name ending in `.` is a prefix: the tag's name goes on after it (a sequence number, a step).",
        "",
        "| tag | on | constant | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{v}` | {_cell(on)} | `{n}` ({m}) | {_cell(c)} |" for n, v, m, on, c in tags]
    lines += [
        "",
        "## What a version may pin",
        "",
        "A version's `requirements.txt` holds only `NAME==VERSION` lines for these packages; the trust check",
        "(`tuneflow verify`, and every load) refuses anything else: "
        + ", ".join(f"`{p}`" for p in REQUIREMENT_PACKAGES)
        + " (`REQUIREMENT_PACKAGES`, registry_base.py).",
        "",
    ]
    return "\n".join(lines)


def events_reference() -> str:
    from tuneflow import watch

    events = commented_constants(SRC / "watch.py", ("EVENT",))
    for name, _, comment in events:
        if not comment:
            raise DocsError(f"{name} in src/tuneflow/watch.py has no comment. Fix: say who emits it, after it")
    resources = [
        (watch.resource_id("<name>"), "resource_id", inspect.getdoc(watch.resource_id) or ""),
        (watch.model_resource("<model>"), "model_resource", inspect.getdoc(watch.model_resource) or ""),
    ]
    lines = [
        "# Events",
        "",
        "The Prefect events tuneflow emits. Deployments trigger on them (see",
        "[Schedules and data triggers](../how-to/schedules.md)) and the alert automations post them",
        "([Alerts](../how-to/alerts.md)); anything else may listen too, or emit them (e.g. an object-storage",
        "webhook emitting `tuneflow.data.arrived`).",
        "",
        '!!! note "Generated"',
        "    From the constants of `src/tuneflow/watch.py` and the comment beside each, when the site is built",
        "    (`docs/hooks.py`).",
        "",
        "| event | constant | emitted |",
        "|---|---|---|",
    ]
    lines += [f"| `{v}` | `{n}` | {_cell(c)} |" for n, v, c in events]
    lines += ["", "## Resources", "", "| resource id | function | meaning |", "|---|---|---|"]
    lines += [f"| `{r}` | `tuneflow.watch.{f}` | {_cell(d)} |" for r, f, d in resources]
    lines.append("")
    return "\n".join(lines)


PAGES = {
    "reference/config.md": config_reference,
    "reference/cli.md": cli_reference,
    "reference/registry.md": registry_reference,
    "reference/events.md": events_reference,
}


def on_files(files, config):  # noqa: ANN001, ANN201 - MkDocs hook signature
    """Add the generated reference pages to the build (they are never written into docs/)."""
    from mkdocs.structure.files import File

    for uri, make in PAGES.items():
        with redirect_stdout(io.StringIO()):  # importing the CLI must not print into the build log
            content = make()
        files.append(File.generated(config, uri, content=content))
    return files
