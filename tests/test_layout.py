"""House rules that keep the layout honest: the library never imports Prefect, imports go one way
(cli -> flows -> tasks -> library) with no cycles among tuneflow's modules (also pyproject's import-linter
contracts), library log lines reach the flow run's logs, no unactionable warnings."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "tuneflow"
LAYERS = {"library": 0, "tasks": 1, "flows": 2, "cli": 3}


def _layer_of_module(name: str) -> str | None:
    if name == "tuneflow.cli" or name == "tuneflow.__main__":
        return "cli"
    for layer in ("tasks", "flows"):
        if name == f"tuneflow.{layer}" or name.startswith(f"tuneflow.{layer}."):
            return layer
    return "library" if name == "tuneflow" or name.startswith("tuneflow.") else None


def _source_files() -> dict[str, Path]:
    """Module name -> file, for every module of the package as installed (src/tuneflow, tasks/, flows/)."""
    out = {}
    for folder, package in (
        (LIBRARY, "tuneflow"),
        (ROOT / "tasks", "tuneflow.tasks"),
        (ROOT / "flows", "tuneflow.flows"),
    ):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_library_imports_without_prefect():
    code = (
        "import importlib, pkgutil, sys, tuneflow\n"
        "names = [m.name for m in pkgutil.walk_packages(tuneflow.__path__, 'tuneflow.')\n"
        "         if not m.name.startswith(('tuneflow.tasks', 'tuneflow.flows')) and m.name != 'tuneflow.__main__']\n"
        "for name in names: importlib.import_module(name)\n"
        "assert len(names) > 15, names\n"
        "loaded = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(len(names), loaded[:5])\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT / "tests")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


# a kind's name tested: `kind == "sft"`, `cfg.kind != 'classification'`, `"sft" == kind` (not `kind_of(v) != cfg.kind`)
KIND_BRANCH = re.compile(r"""\bkind\s*[!=]=\s*["']|["']\s*[!=]=\s*[\w.]*\bkind\b""")


def kind_branches(files: dict[str, Path]) -> list[str]:
    """``kind ==`` / ``kind !=`` tests outside ``tuneflow.kinds``: what differs by kind belongs to the kind."""
    return [
        f"{name}:{n}: {line.strip()}"
        for name, path in sorted(files.items())
        if not (name == "tuneflow.kinds" or name.startswith("tuneflow.kinds."))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if KIND_BRANCH.search(line.split("#")[0])
    ]


def test_the_stages_ask_the_kind_and_never_test_its_name(tmp_path):
    assert kind_branches(_source_files()) == []
    # the check sees one when it is added
    added = tmp_path / "added.py"
    added.write_text('if cfg.kind == "sft":\n    pass\nif "sft" != config.kind:\n    pass\n', encoding="utf-8")
    assert len(kind_branches({"tuneflow.added": added})) == 2 or pytest.fail("the grep misses a kind branch")


def test_the_config_imports_no_model_stack():
    code = (
        "import sys, tuneflow.config\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'pandas', 'great_expectations') if m in sys.modules)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT / "tests")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_no_module_of_the_library_names_prefect():
    offenders = [
        (name, sorted(i for i in _imports(path) if i.split(".")[0] == "prefect"))
        for name, path in _source_files().items()
        if _layer_of_module(name) == "library"
    ]
    assert [o for o in offenders if o[1]] == []


def test_imports_go_one_way_cli_flows_tasks_library():
    wrong = []
    for name, path in _source_files().items():
        here = _layer_of_module(name)
        for imported in _imports(path):
            there = _layer_of_module(imported)
            if there is not None and LAYERS[there] > LAYERS[here]:
                wrong.append(f"{name} ({here}) imports {imported} ({there})")
            if imported.split(".")[0] in ("tasks", "flows"):
                wrong.append(f"{name} imports bare {imported}")
    assert wrong == []


def _module_graph() -> dict[str, set[str]]:
    """Module -> the tuneflow modules it imports (module level, inside functions, under TYPE_CHECKING)."""
    files = _source_files()

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = {owner(i) for i in _imports(path)} - {None, name}
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_tuneflow_modules():
    """Library, tasks and flows together (import-linter sees src/tuneflow only); a function-level import that
    closes a cycle counts: move the shared piece down into a leaf (registry_base, train_common) instead."""
    graph = _module_graph()
    assert len(graph) > 30
    assert _cycles(graph) == []
    assert _cycles({**graph, "tuneflow.registry_base": {"tuneflow.scoring"}})  # it sees a cycle when there is one


def test_tuneflow_tag_names_are_spelled_only_in_registry_base():
    """Every ``tuneflow.*`` tag name is a constant of ``tuneflow.registry_base``; elsewhere a literal that looks like
    one is a module or logger name, or a Prefect event or resource (``*EVENT`` / ``*RESOURCE`` constants of
    ``tuneflow.watch``)."""
    files = _source_files()
    wrong = []
    for name, path in files.items():
        if name == "tuneflow.registry_base":
            continue
        tree = ast.parse(path.read_text())
        events = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id.endswith(("EVENT", "RESOURCE")) for t in node.targets)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            value = node.value
            if re.fullmatch(r"tuneflow\.[a-z_.]+", value) and value not in files and id(node) not in events:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {value!r}")
    assert wrong == [], "spell these as registry_base constants"


def _layout_block() -> str:
    """The layout tree of the docs: the fenced block that starts with ``src/tuneflow/`` (README or docs/)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        if not page.is_file():
            continue
        blocks, current = [], None
        for line in page.read_text().splitlines():
            if line.startswith("```") and current is None:
                current = []
            elif line.startswith("```"):
                blocks.append("\n".join(current))
                current = None
            elif current is not None:
                current.append(line)
        for block in blocks:
            if block.lstrip().startswith("src/tuneflow/"):
                return block
    raise AssertionError("no layout tree (a fenced block starting with src/tuneflow/) in README.md or docs/")


def test_the_documented_layout_names_every_module():
    """Every module of the library, tasks and flows has its line in the layout tree, so the tree follows the code."""
    block = _layout_block()
    named = set(re.findall(r"^\s*([\w/]+\.py)\b", block, flags=re.M))
    missing = []
    for folder, prefix in ((LIBRARY, ""), (ROOT / "tasks", ""), (ROOT / "flows", "")):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).as_posix()
            if path.name in ("__init__.py", "__main__.py") and rel != "kinds/__init__.py":
                continue
            if prefix + rel not in named:
                missing.append(path.relative_to(ROOT).as_posix())
    assert missing == [], f"add these to the layout tree: {missing}"


def test_the_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts, as `make lint` runs them."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_every_stage_has_one_task_module():
    tasks = {p.stem for p in (ROOT / "tasks").glob("*.py")} - {"__init__"}
    assert tasks == {"validate", "monitor", "tokenize", "train", "evaluate", "register", "predict", "search"}


def test_library_log_lines_reach_the_flow_run_logs(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.runtime import flow_run

    from tuneflow.config import ValidationConfig
    from tuneflow.data import LoadedData
    from tuneflow.validation import drop_out_of_bounds

    class Cfg:  # drop_out_of_bounds reads cfg.validation and cfg.kind only
        kind = "classification"
        validation = ValidationConfig(min_text_chars=2, max_text_chars=10, text_length_mostly=0.5)

    loaded = LoadedData(
        pd.DataFrame({"text": ["ok text", "x", "far too long a text"], "label": ["a"] * 3}), Path("x"), "d"
    )

    @flow
    def uses_the_library() -> str:
        kept, dropped = drop_out_of_bounds(loaded, Cfg)  # logs a warning through logging.getLogger("tuneflow...")
        assert dropped == 2 and len(kept.frame) == 1
        logging.getLogger("tuneflow.layout_probe").info("info line from the library")
        return str(flow_run.get_id())

    run_id = uses_the_library()
    APILogHandler().flush()  # logs are shipped in batches by a background worker
    messages: list[tuple[str, str]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(n.startswith("tuneflow.") for n, _ in messages):
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        messages = [(log.name, log.message) for log in logs]
        time.sleep(0.5)
    assert any(n == "tuneflow.validation" and "dropping 2 rows" in m for n, m in messages), messages
    assert any(n == "tuneflow.layout_probe" and "info line" in m for n, m in messages), messages


def test_logging_dataset_inputs_raises_no_mlflow_source_warning(workdir):
    import mlflow

    from tuneflow.config import PipelineConfig
    from tuneflow.data import LoadedData, split_by_text_hash
    from tuneflow.tracking import log_dataset_inputs

    frame = pd.DataFrame({"text": [f"text {i}" for i in range(20)], "label": ["ham", "spam"] * 10})
    cfg = PipelineConfig.model_validate(
        {
            "name": "w",
            "data": {"path": str(workdir / "d.csv"), "labels": ["ham", "spam"]},
            "model": {"base_model": "x"},
            "registry": {"model_name": "w"},
        }
    )
    loaded = LoadedData(frame, workdir / "d.csv", "0" * 64, sources=(workdir / "d.csv",))
    with mlflow.start_run(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_dataset_inputs(cfg, loaded, split_by_text_hash(frame, 0.3, "s"))
    assert [str(w.message) for w in caught if "mlflow" in w.filename] == []
