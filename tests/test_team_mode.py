"""Team mode as docs/how-to/team-mode.md sets it up, every part a real server on loopback, each in its own folder:
PostgreSQL (two databases), an MLflow tracking server on it that stores and serves the artifacts, a Prefect
server on it, a process work pool, the deployments of deployments/prefect.yaml created by `prefect deploy`, and
two workers, each started from its own `git clone` of this repository's HEAD (what a second machine has), with
its own cache folder. The clones get a test config (the tiny model, a landing zone in a temporary folder, cron
`* * * * *`) and a prefect.yaml derived from the shipped one by replacing its config and model names.

Scenarios, in order, on the one stack: a scheduled run fires; a batch dropped into the landing zone is retrained
(the watcher runs as the deployment watch/landing on a worker) and its model downloads through the server; two
retrains started at once run one after the other; `tuneflow models / compare / promote / rollback` work against
the server; a worker killed during training leaves the slot and registry consistent and its run is marked
Crashed (and alerted); the deployment tune/<name> with search.workers 2 runs the trials of one study on PostgreSQL
in two processes (itself and a run of tune-worker/<name>), no trial twice. The Prefect UI test (marker ui too) opens
the server's UI in headless Chromium.
Every process is killed in ``finally``. Run with ``pytest -m team``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import make_rows, tiny_config_dict
from servers import CHROMIUM, PrefectApi, WebhookReceiver, chromium, free_port, stop_group, wait_until_up

pytestmark = [pytest.mark.team, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
NAME, MODEL = "tiny-team", "tiny-team-clf"
PG_USER, PG_PASSWORD = "tuneflow", "team-test-pw"
TUNE_TRIALS = 6
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ARTIFACTS = REPO / "test-artifacts"
# What the shipped prefect.yaml names, and what the test's copy names instead (each must occur in the shipped file).
RENAMES = {
    "configs/sms-spam-landing.yaml": f"configs/{NAME}.yaml",
    "sms-spam-landing": NAME,
    "sms-spam-classifier": MODEL,
    '- cron: "0 3 * * 1"': '- cron: "* * * * *"',
}


def _pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, or next to initdb's real location (Debian keeps them in .../15/bin)."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    assert initdb, "PostgreSQL is not installed: apt-get install -y postgresql (initdb, postgres, createdb)"
    found = Path(os.path.realpath(initdb)).parent / name
    assert found.exists(), f"{found} missing: apt-get install -y postgresql"
    return str(found)


def _as_db_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: as root, run it as the unprivileged user nobody.
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


class Team(PrefectApi):
    """The running stack and the client helpers the scenarios share."""

    def __init__(self, tmp: Path, marker: str):
        self.tmp, self.marker = tmp, marker
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_files: dict[str, Path] = {}

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        self.log_files[name] = self.tmp / f"{name}.log"
        with open(self.log_files[name], "w") as fh:
            self.procs[name] = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.procs[name]

    def tail(self, name: str, n: int = 3000) -> str:
        return f"--- {name} log ---\n{self.log_files[name].read_text(errors='replace')[-n:]}"

    def run(self, run_id):
        with self.client() as c:
            return c.read_flow_run(run_id)

    def wait_state(self, run_id, states: set[str], timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run.state_type.value in states:
                return run
            assert time.monotonic() < deadline, (
                f"run {run.name} is {run.state_type.value} after {timeout:.0f} s, wanted {states}\n"
                + self.explain(run)
                + "\n".join(self.tail(w, 1500) for w in ("worker-a", "worker-b"))
            )
            time.sleep(1)

    def start_retrain(self, **parameters):
        """A run of retrain/scheduled started by hand (what a click on "Run" in the UI does)."""
        with self.client() as c:
            dep = c.read_deployment_by_name("retrain/scheduled")
            return c.create_flow_run_from_deployment(
                dep.id, parameters={"config_path": f"configs/{NAME}.yaml", **parameters}
            )

    def log_time(self, run_id, text: str, timeout: float = 30):
        """When a run logged a line containing ``text`` (logs reach the server in batches, maybe after the end)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line.timestamp for line in self.logs(run_id) if text in line.message]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no log line {text!r} in run {run_id}"
            time.sleep(1)

    def explain(self, run) -> str:
        tail = self.logs(run.id)[-10:]
        return f"run {run.name} {run.state_type.value} ({run.state.message}):\n" + "\n".join(
            line.message[:600] for line in tail
        )

    def worker_of(self, run_id) -> str:
        """Which worker ran the run: both may try to submit it; the server lets one, the other logs "Aborted"."""
        found = []
        for w in ("worker-a", "worker-b"):
            log = self.log_files[w].read_text(errors="replace")
            if f"submitting flow run '{run_id}'" in log and f"Aborted submission of flow run '{run_id}'" not in log:
                found.append(w)
        assert len(found) == 1, f"run {run_id} in the logs of {found}"
        return found[0]

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri, self.tracking_uri)

    def versions(self) -> list[str]:
        return sorted((str(v.version) for v in self.mlflow().search_model_versions(f"name='{MODEL}'")), key=int)

    def drop(self, name: str, seed: int, n: int = 30) -> Path:
        path = self.landing / "incoming" / name
        tmp = path.with_name(name + ".part")  # written under a name the watcher ignores, then renamed
        make_rows(n, seed=seed).to_csv(tmp, index=False)
        os.rename(tmp, path)
        return path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The tuneflow CLI as a person on a third machine runs it: from a clone, only the servers' URLs set."""
        done = subprocess.run(
            [sys.executable, "-m", "tuneflow.cli", *args],
            cwd=self.clones[0],
            env=self.client_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert not check or done.returncode == 0, f"tuneflow {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
        return done

    def prefect(self, *args: str) -> str:
        """The prefect CLI as the person who deploys runs it (from a clone, with PREFECT_API_URL)."""
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=self.clones[0],
            env=self.deployer_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}: exit {done.returncode}\n{done.stdout[-3000:]}"
        return done.stdout

    def kill_marked(self) -> None:
        """SIGKILL every process left that carries this test's marker (flow runs start their own sessions)."""
        needle = f"TUNEFLOW_TEAM_TEST={self.marker}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def _base_env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TUNEFLOW_"))}
    return env | {
        "TUNEFLOW_TEAM_TEST": marker,  # lets finally find every process the stack started, however detached
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def _wait_for_pg(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"postgres exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, password=PG_PASSWORD, dbname="postgres").close()
            return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, f"postgres not up in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_model_dir):
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("team")
    marker = uuid.uuid4().hex
    st = Team(tmp, marker)
    env = _base_env(marker)
    # PostgreSQL runs as nobody, who cannot enter pytest's root-only temp folders: its own folder under /tmp.
    pg_dir = Path(tempfile.mkdtemp(prefix="tuneflow-team-pg-"))
    hook = WebhookReceiver()
    try:
        # --- PostgreSQL: one cluster, databases mlflow and prefect, password auth on loopback
        (pg_dir / "pw").write_text(PG_PASSWORD + "\n")
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for p in (pg_dir, pg_dir / "pw"):
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
        init = subprocess.run(
            _as_db_user([_pg_bin("initdb"), "-D", str(pg_dir / "data"), "-U", PG_USER, f"--pwfile={pg_dir / 'pw'}",
                         "--auth=scram-sha-256", "--locale=C", "-E", "UTF8"]),
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        pg_port = free_port()
        pg = st.start(
            "postgres",
            _as_db_user([_pg_bin("postgres"), "-D", str(pg_dir / "data"), "-p", str(pg_port), "-k", str(pg_dir),
                         "-h", "127.0.0.1"]),
            env, pg_dir,
        )  # fmt: skip
        _wait_for_pg(pg_port, pg, st.log_files["postgres"])
        for db in ("mlflow", "prefect"):
            made = subprocess.run(
                [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", PG_USER, db],
                env=env | {"PGPASSWORD": PG_PASSWORD}, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
        db_url = st.db_url = f"{PG_USER}:{PG_PASSWORD}@127.0.0.1:{pg_port}"

        # --- MLflow server: runs and registry in PostgreSQL, artifacts in its own folder, served over HTTP
        ml_port, artifacts = free_port(), tmp / "mlflow-server" / "artifacts"
        artifacts.mkdir(parents=True)
        ml = st.start(
            "mlflow",
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"postgresql://{db_url}/mlflow",
             "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", "127.0.0.1",
             "--port", str(ml_port), "--workers", "1"],
            env, artifacts.parent,
        )  # fmt: skip
        # --- Prefect server on the same PostgreSQL, its own PREFECT_HOME
        pf_port = free_port()
        st.api = f"http://127.0.0.1:{pf_port}/api"
        pf = st.start(
            "prefect-server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(pf_port)],
            env
            | {
                "PREFECT_HOME": str(tmp / "prefect-server" / "home"),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{db_url}/prefect",
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # test only: the cron run is made sooner
                # as docs/how-to/team-mode.md's recipe: slot leases on disk survive a server restart
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
                # The UI calls the API at PREFECT_UI_API_URL (default: port 4200); alerts link to PREFECT_UI_URL.
                "PREFECT_UI_API_URL": st.api,
                "PREFECT_UI_URL": st.api.removesuffix("/api"),
            },
            tmp,
        )
        wait_until_up(f"http://127.0.0.1:{ml_port}/health", ml, st.log_files["mlflow"], timeout_s=180)
        wait_until_up(f"{st.api}/health", pf, st.log_files["prefect-server"], timeout_s=180)
        st.tracking_uri, st.artifacts_dir = f"http://127.0.0.1:{ml_port}", artifacts

        # --- the landing zone (a shared mount in real life) and two clones of HEAD, one per "machine"
        st.landing = tmp / "landing"
        (st.landing / "accepted").mkdir(parents=True)
        (st.landing / "incoming").mkdir()
        make_rows(60, seed=100).to_csv(st.landing / "accepted" / "seed.csv", index=False)
        cfg = tiny_config_dict(Path("unused"), tiny_model_dir, train={"epochs": 2}, registry={"model_name": MODEL})
        cfg |= {
            "name": NAME,
            "data": {"landing": str(st.landing), "labels": ["ham", "spam"], "eval_fraction": 0.25},
            "schedule": {"cron": "* * * * *", "timezone": "UTC"},
            "watch": {"quiet_seconds": 1, "poll_seconds": 0.3},
            # tune/tiny-team: two processes on one study in a database of its own beside MLflow's (not created
            # here: tuneflow creates it); trials long enough (epochs) that the second process starts before the
            # first has run them all; no pruning, so every trial trains to its end
            "search": {
                "trials": TUNE_TRIALS,
                "workers": 2,
                "timeout_minutes": 20,
                "min_trial_minutes": 0.05,
                "heartbeat_seconds": 10,
                "storage": f"postgresql+psycopg://{db_url}/optuna",
                "space": {
                    "learning_rate": {"low": 1e-3, "high": 1e-2},
                    "batch_size": [8, 16],
                    "epochs": {"low": 6, "high": 10},
                },
                "pruner": {"startup_trials": TUNE_TRIALS},
            },
        }
        shipped = (REPO / "deployments" / "prefect.yaml").read_text()
        spec = shipped
        for old, new in RENAMES.items():
            assert old in spec, f"deployments/prefect.yaml no longer names {old!r}: update RENAMES in this test"
            spec = spec.replace(old, new)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        st.clones = []
        for name in ("clone-a", "clone-b"):
            clone = tmp / name
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
            got = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
            assert got.strip() == head, f"{name} is at {got.strip()}, the worktree at {head}"
            (clone / "configs" / f"{NAME}.yaml").write_text(yaml.safe_dump(cfg))
            (clone / "deployments" / "prefect.yaml").write_text(spec)
            st.clones.append(clone)

        # What every client and worker knows: the two servers' URLs. Never the artifact folder.
        st.client_env = env | {"PREFECT_API_URL": st.api, "MLFLOW_TRACKING_URI": st.tracking_uri}
        assert str(artifacts) not in repr(st.client_env)
        deployer = st.deployer_env = st.client_env | {"PREFECT_HOME": str(tmp / "deployer-home")}
        for cmd in (
            ["prefect", "work-pool", "create", "tuneflow", "--type", "process"],
            ["prefect", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            ["tuneflow", "alerts", "--config", f"configs/{NAME}.yaml"],
        ):
            done = subprocess.run(
                [sys.executable, "-m", "tuneflow.cli" if cmd[0] == "tuneflow" else "prefect", *cmd[1:]],
                cwd=st.clones[0], env=deployer | {"TUNEFLOW_ALERT_WEBHOOK_URL": hook.url},
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            out = done.stdout[-3000:] + done.stderr[-3000:]
            assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}\n{out}"
        for letter, clone in zip("ab", st.clones, strict=True):
            st.start(
                f"worker-{letter}",
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    "tuneflow",
                    "--name",
                    f"worker-{letter}",
                ],  # noqa: E501
                st.client_env
                | {
                    "TUNEFLOW_HOME": str(clone),
                    "TUNEFLOW_CACHE_DIR": str(tmp / f"cache-{letter}"),
                    "PREFECT_HOME": str(tmp / f"home-{letter}"),
                    "PREFECT_WORKER_QUERY_SECONDS": "2",  # test only: pick runs up sooner (default 10 s)
                },
                clone,
            )
        st.hook = hook
        print(f"team stack up in {time.monotonic() - t0:.0f} s")
        yield st
    finally:
        for name in reversed(list(st.procs)):
            if name == "postgres":
                continue
            stop_group(st.procs[name])
        st.kill_marked()
        if "postgres" in st.procs and st.procs["postgres"].poll() is None:
            os.killpg(st.procs["postgres"].pid, signal.SIGINT)  # fast shutdown: disconnect clients, stop
            try:
                st.procs["postgres"].wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_group(st.procs["postgres"])
        hook.server.shutdown()
        shutil.rmtree(pg_dir, ignore_errors=True)


def test_a_scheduled_run_fires_on_a_worker_and_registers_a_version(team):
    t0 = time.monotonic()
    deadline = time.monotonic() + 180
    while not [r for r in team.runs("retrain/scheduled") if r.state_type.value in TERMINAL]:
        assert time.monotonic() < deadline, "no scheduled run finished in 180 s\n" + team.tail("worker-a")
        time.sleep(2)
    first = team.runs("retrain/scheduled")[0]
    assert first.state_type.value == "COMPLETED", team.explain(first)
    assert team.versions() == ["1"]
    with team.client() as c:
        dep = c.read_deployment_by_name("retrain/scheduled")
        assert [s.schedule.cron for s in dep.schedules] == ["* * * * *"]
        c.pause_deployment(dep.id)  # the scenarios below count runs: no more minute-by-minute retrains
    deadline = time.monotonic() + 120
    while any(r.state_type.value not in TERMINAL for r in team.runs("retrain/scheduled")):
        assert time.monotonic() < deadline, "a second scheduled run kept running"
        time.sleep(1)
    mv = team.mlflow().get_model_version(MODEL, "1")
    assert mv.tags["tuneflow.prefect_flow_run_id"] == str(first.id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert mv.tags["tuneflow.git_commit"].startswith(head)  # the flow code came from a clone of HEAD
    print(f"scheduled run {first.name} on {team.worker_of(first.id)}, done after {time.monotonic() - t0:.0f} s")


def _retrain_a_dropped_batch(team, name: str, seed: int):
    """Drop a batch into the landing zone and wait for the one retrain it triggers; returns that (completed) run."""
    n0 = len(team.runs("retrain/on-new-data"))
    team.drop(name, seed=seed)
    deadline = time.monotonic() + 240
    while True:
        runs = team.runs("retrain/on-new-data")[n0:]
        if runs and all(r.state_type.value in TERMINAL for r in runs):
            break
        assert time.monotonic() < deadline, f"no retrain of {name} in 240 s: {runs}\n" + team.tail("worker-a")
        time.sleep(1)
    (run,) = runs
    assert run.state_type.value == "COMPLETED", team.explain(run)
    return run


def test_a_batch_dropped_into_the_landing_zone_is_retrained_and_its_model_downloads_through_the_server(team, tmp_path):
    import mlflow

    before = team.versions()
    t0 = time.monotonic()
    run = _retrain_a_dropped_batch(team, "batch-1.csv", seed=1)
    assert [f["name"] for f in run.parameters["trigger"]["files"]] == ["batch-1.csv"]
    assert (team.landing / "accepted" / "batch-1.csv").exists()
    versions = team.versions()
    assert len(versions) == len(before) + 1
    new = versions[-1]

    # Artifacts go through the server: the experiment stores them under mlflow-artifacts:, the client
    # downloads the model over HTTP, and the files are in the server's folder, which no client env names.
    client = team.mlflow()
    mv = client.get_model_version(MODEL, new)
    exp = client.get_experiment_by_name(NAME)
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    assert str(team.artifacts_dir) not in (mv.source or "") + exp.artifact_location
    mlflow.set_tracking_uri(team.tracking_uri)
    mlflow.set_registry_uri(team.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{new}", dst_path=str(tmp_path / "dl")))
    weights = list(local.rglob("*.safetensors"))
    assert weights and (local / "MLmodel").exists()
    on_server = {p.name: p.stat().st_size for p in team.artifacts_dir.rglob("*.safetensors")}
    assert all(on_server.get(w.name) == w.stat().st_size for w in weights)  # the same files, from the server
    print(f"batch-1.csv -> {run.name} on {team.worker_of(run.id)} -> v{new} in {time.monotonic() - t0:.0f} s")


def test_two_retrains_started_at_once_run_one_after_the_other(team):
    """Both take the model's slot (the global concurrency limit retrain-<model>): their slot windows
    never overlap, whichever worker runs each."""
    before = team.versions()
    a, b = team.start_retrain(force=True), team.start_retrain(force=True)
    runs = [team.wait_state(r.id, TERMINAL, timeout=300) for r in (a, b)]
    assert [r.state_type.value for r in runs] == ["COMPLETED", "COMPLETED"], "\n".join(map(team.explain, runs))
    windows = sorted(
        (team.log_time(r.id, "got the retrain slot"), team.log_time(r.id, "released the retrain slot"), r) for r in runs
    )
    (got1, released1, first), (got2, released2, second) = windows
    assert got1 < released1 <= got2 < released2, windows
    waited = team.log_time(second.id, "waiting for the retrain slot")
    assert waited < released1  # the second was there, waiting, while the first held the slot
    assert len(team.versions()) == len(before) + 2
    workers = [team.worker_of(r.id) for r in (first, second)]
    print(f"slot windows {got1}..{released1} ({workers[0]}) and {got2}..{released2} ({workers[1]})")


def test_the_cli_reviews_promotes_and_rolls_back_against_the_server(team):
    client = team.mlflow()
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    versions = team.versions()
    other = next(v for v in reversed(versions) if v != champion)
    listing = team.cli("models", MODEL).stdout
    for v in versions:
        assert re.search(rf"^{MODEL}\s+{v}\b", listing, re.M), listing
    assert "champion" in listing
    cfg = f"configs/{NAME}.yaml"
    compared = team.cli("compare", MODEL, champion, other, "--config", cfg).stdout
    assert f"| metric | v{champion} (champion) | v{other} |" in compared and "| macro_f1 |" in compared, compared
    team.cli("promote", MODEL, other, "--reason", "team test: promote", "--config", cfg)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == other
    team.cli("rollback", MODEL, "--reason", "team test: roll back")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == champion
    history = team.cli("models", MODEL, "--history").stdout
    assert "team test: promote" in history and "team test: roll back" in history, history


def test_a_worker_killed_during_training_leaves_the_slot_and_registry_consistent_and_its_run_crashed(team):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from tuneflow.flows.retrain import limit_name
    from tuneflow.history import registry_problems

    before = team.versions()
    aliases = dict(team.mlflow().get_registered_model(MODEL).aliases)
    run = team.start_retrain(force=True, overrides=["train.epochs=400"])  # long enough to be killed in training
    deadline = time.monotonic() + 240
    while True:
        with team.client() as c:
            tasks = c.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
        if any(t.name.startswith("train") and t.state_type.value == "RUNNING" for t in tasks):
            break
        assert team.run(run.id).state_type.value not in TERMINAL, team.explain(team.run(run.id))
        assert time.monotonic() < deadline, "training did not start in 240 s"
        time.sleep(0.5)
    time.sleep(3)  # some steps and a checkpoint in
    worker = team.worker_of(run.id)
    pid = int(team.run(run.id).infrastructure_pid)
    # The machine is lost: the flow-run process (its own process group) and the worker, SIGKILL, no cleanup.
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    os.killpg(team.procs[worker].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    team.procs[worker].wait(timeout=30)

    # The slot: its lease (60 s, renewed every 45 s) runs out and the server frees it.
    deadline = time.monotonic() + 150
    while True:
        with team.client() as c:
            active = c.read_global_concurrency_limit_by_name(limit_name(MODEL)).active_slots
        if active == 0:
            break
        assert time.monotonic() < deadline, f"slot still taken {time.monotonic() - killed_at:.0f} s after the kill"
        time.sleep(2)
    slot_free_s = time.monotonic() - killed_at
    # The registry: no version of the killed run, aliases where they were, every alias on a version with its card.
    import mlflow

    mlflow.set_tracking_uri(team.tracking_uri)
    mlflow.set_registry_uri(team.tracking_uri)
    assert team.versions() == before
    assert dict(team.mlflow().get_registered_model(MODEL).aliases) == aliases
    assert registry_problems(MODEL) == []
    # The run: no heartbeat for 90 s -> the automation "tuneflow: crash unresponsive flow runs" marks it Crashed,
    # and the failed-retrain alert posts it.
    crashed = team.wait_state(run.id, {"CRASHED", "FAILED", "COMPLETED", "CANCELLED"}, timeout=240)
    assert crashed.state_type.value == "CRASHED" and "heartbeat" in (crashed.state.message or ""), crashed.state
    crashed_s = time.monotonic() - killed_at
    alert = team.hook.wait_for(lambda a: crashed.name in a.get("body", ""), timeout=90)
    assert alert["subject"] == f"tuneflow: retrain of {MODEL} failed" and "Crashed" in alert["body"]

    # The next retrain of the model gets the slot on the surviving worker, trains and registers; on its way
    # it marks the MLflow runs the killed process left RUNNING as KILLED (same host, process gone).
    nxt = team.wait_state(team.start_retrain(force=True).id, TERMINAL, timeout=300)
    assert nxt.state_type.value == "COMPLETED", team.explain(nxt)
    assert team.worker_of(nxt.id) != worker
    assert len(team.versions()) == len(before) + 1 and registry_problems(MODEL) == []
    exp = team.mlflow().get_experiment_by_name(NAME)
    killed = team.mlflow().search_runs(
        [exp.experiment_id], filter_string=f"tags.`tuneflow.prefect_flow_run_id` = '{run.id}'"
    )
    assert killed and all(r.info.status == "KILLED" for r in killed), [(r.info.run_name, r.info.status) for r in killed]
    print(f"killed {worker}: slot free after {slot_free_s:.0f} s, run Crashed after {crashed_s:.0f} s")


def test_no_two_retrains_of_the_model_ever_held_the_slot_at_once_on_either_worker(team):
    """Every retrain of the scenarios above (scheduled, triggered, started by hand; on worker-a and worker-b):
    the slot windows, ordered by when each got the slot, never overlap."""
    runs = [
        r
        for d in ("retrain/scheduled", "retrain/on-new-data")
        for r in team.runs(d)
        if any("got the retrain slot" in x.message for x in team.logs(r.id))
    ]
    done = [r for r in runs if r.state_type.value == "COMPLETED"]  # the killed run's slot went with its lease
    windows = sorted(
        (team.log_time(r.id, "got the retrain slot"), team.log_time(r.id, "released the retrain slot"), r.name)
        for r in done
    )
    for (_, released, name), (got, _, after) in zip(windows, windows[1:], strict=False):
        assert released <= got, f"{after} got the slot at {got}, before {name} released it at {released}"
    workers = {team.worker_of(r.id) for r in runs}
    assert len(done) >= 5 and workers == {"worker-a", "worker-b"}, (len(done), workers)
    print(f"{len(done)} retrains, slot windows disjoint, on {sorted(workers)}")


def _page(url: str, name: str, tmp: Path) -> str:
    """Screenshot and rendered DOM of ``url`` into test-artifacts/prefect-<name>.*; returns the DOM's text."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"prefect-{name}.png"
    shot.unlink(missing_ok=True)
    chromium([f"--screenshot={shot}", url], tmp / f"profile-{name}-shot", budget_ms=20000, window="1400,1800")
    dom = chromium(["--dump-dom", url], tmp / f"profile-{name}-dom", budget_ms=20000, window="1400,1800").stdout
    (ARTIFACTS / f"prefect-{name}.html").write_text(dom)
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot of {url}"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.ui
@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium); .ci/run installs it",
)
def test_the_prefect_ui_shows_the_schedule_the_trigger_and_a_retrains_artifact(team, tmp_path):
    ui = team.api.removesuffix("/api")
    with team.client() as c:
        scheduled = c.read_deployment_by_name("retrain/scheduled")
        triggered = c.read_deployment_by_name("retrain/on-new-data")
    text = _page(f"{ui}/deployments", "deployments", tmp_path)
    for name in ("scheduled", "on-new-data", "batch", "landing"):
        assert re.search(rf"\b{name}\b", text), f"deployment {name} not on {ui}/deployments; see {ARTIFACTS}"
    text = _page(f"{ui}/deployments/deployment/{scheduled.id}", "deployment-scheduled", tmp_path)
    assert re.search(r"Schedules .*Every minute", text), (
        f"the cron of retrain/scheduled not on its page; see {ARTIFACTS}/prefect-deployment-scheduled.*"
    )
    text = _page(f"{ui}/deployments/deployment/{triggered.id}", "deployment-on-new-data", tmp_path)
    assert f"{NAME}: retrain on new data" in text, (
        f"the trigger's automation not on the on-new-data page; see {ARTIFACTS}/prefect-deployment-on-new-data.*"
    )
    with team.client() as c:
        (automation,) = c.read_automations_by_name(f"{NAME}: retrain on new data")
    text = _page(f"{ui}/automations/automation/{automation.id}", "automation-on-new-data", tmp_path)
    # The UI shows a deployment trigger as "A custom trigger" (the event name only in its JSON).
    assert re.search(r"Trigger .*custom trigger .*Action Run deployment: on-new-data", text), (
        f"the trigger or its action not on the automation's page; see {ARTIFACTS}/prefect-automation-*"
    )

    # a completed retrain of a dropped batch: the one the landing-zone test made, or one made here (`-m ui` alone)
    done = next((r for r in team.runs("retrain/on-new-data") if r.state_type.value == "COMPLETED"), None)
    if done is None:  # the cron's runs would take the batch first: no more of them, as the schedule test does
        with team.client() as c:
            c.pause_deployment(scheduled.id)
        for r in team.runs("retrain/scheduled"):
            team.wait_state(r.id, TERMINAL, timeout=300)
        done = _retrain_a_dropped_batch(team, "batch-ui.csv", seed=5)
    # The flow-run page of the V1 UI falls back to its Logs tab while the run loads (the Artifacts tab is hidden
    # until then), so ?tab=Artifacts is lost there; the V2 UI (under /v2, prefect 3.9) keeps it.
    text = _page(f"{ui}/v2/runs/flow-run/{done.id}?tab=Artifacts", "flow-run-artifacts", tmp_path)
    assert re.search(rf"MARKDOWN {NAME}-retrain [A-Z].*Eval metrics and promotion decision for {MODEL}", text), (
        f"artifact {NAME}-retrain not on the run's Artifacts tab; see {ARTIFACTS}/prefect-flow-run-artifacts.*"
    )
    with team.client() as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        (art,) = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[done.id]), key=ArtifactFilterKey(any_=[f"{NAME}-retrain"])
            )
        )
    text = _page(f"{ui}/artifacts/artifact/{art.id}", "retrain-artifact", tmp_path)
    assert "macro_f1" in text and "Registered" in text, f"the artifact's markdown not rendered; see {ARTIFACTS}"


def test_the_docker_and_kubernetes_pools_of_prefect_yaml_pass_prefects_own_job_templates(team):
    """No container engine here, so no container runs; but the server checks a deployment's job variables
    against its pool type's template (an unknown image_pull_policy is refused with 409): the shipped
    definitions must deploy as they are onto real docker and kubernetes pools."""
    # the clone's deployments/prefect.yaml is the test's copy: the shipped file is HEAD's
    shipped = subprocess.run(
        ["git", "show", "HEAD:deployments/prefect.yaml"], cwd=team.clones[0], capture_output=True, text=True, check=True
    ).stdout
    pools = yaml.safe_load(shipped)["definitions"]["work_pools"]
    for kind in ("docker", "kubernetes"):
        # retrain/scheduled of the shipped file, renamed and moved onto the container pool
        spec = shipped.replace("  - name: scheduled\n", f"  - name: scheduled-{kind}\n", 1)
        spec = spec.replace("work_pool: *tuneflow_pool", f"work_pool: *tuneflow_{kind}_pool", 1)
        first = yaml.safe_load(spec)["deployments"][0]
        assert (first["name"], first["work_pool"]["name"]) == (f"scheduled-{kind}", f"tuneflow-{kind}")
        path = team.clones[0] / "deployments" / f"prefect-{kind}.yaml"
        path.write_text(spec)
        team.prefect("work-pool", "create", f"tuneflow-{kind}", "--type", kind)
        team.prefect("deploy", "--prefect-file", str(path.relative_to(team.clones[0])), "--name", f"scheduled-{kind}")
        with team.client() as c:
            dep = c.read_deployment_by_name(f"retrain/scheduled-{kind}")
            c.pause_deployment(dep.id)  # no worker of that pool here: no runs piling up as Late
        assert dep.work_pool_name == f"tuneflow-{kind}"
        assert dep.job_variables["image"] == pools[f"tuneflow-{kind}"]["job_variables"]["image"]
        assert dep.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"


def test_a_tune_run_with_two_workers_runs_each_trial_of_its_study_once_on_postgresql(team):
    """tune/<name> with search.workers 2: the tune run starts a run of tune-worker/<name>, both run trials of one
    study in the database optuna on the team's PostgreSQL (created by tuneflow, beside MLflow's), the study ends
    with exactly its trials, each run once as one MLflow run nested under the tune run's parent run on the MLflow
    server; then the best model goes through the gate."""
    import optuna

    with team.client() as c:  # no minute-by-minute retrains competing for the 2 cores (as the first test does)
        c.pause_deployment(c.read_deployment_by_name("retrain/scheduled").id)
        dep = c.read_deployment_by_name(f"tune/{NAME}")
        started = c.create_flow_run_from_deployment(dep.id, parameters={"config_path": f"configs/{NAME}.yaml"})
    t0 = time.monotonic()
    run = team.wait_state(started.id, TERMINAL, timeout=540)
    assert run.state_type.value == "COMPLETED", team.explain(run)
    (helper,) = team.runs(f"tune-worker/{NAME}")
    assert helper.state_type.value == "COMPLETED", team.explain(helper)
    assert team.log_time(run.id, f"worker run {helper.name}: COMPLETED")  # the tune run reported its worker

    # the study, on PostgreSQL: exactly its trials, all finished (a trial asked for when the study had them all is
    # marked surplus and never ran: it has no settings and no MLflow run)
    study = optuna.load_study(study_name=NAME, storage=f"postgresql+psycopg://{team.db_url}/optuna")
    everything = study.get_trials()
    trials = [t for t in everything if "surplus" not in t.user_attrs]
    assert len(trials) == TUNE_TRIALS, [(t.number, t.state.name, t.user_attrs) for t in everything]
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state.name) for t in trials]
    assert all(not t.params and "mlflow_run_id" not in t.user_attrs for t in everything if t not in trials)
    settings = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(settings)) == len(settings)  # no parameter set twice

    # MLflow, on the server: the tune run's parent run and one nested run per trial, each trial number once
    client = team.mlflow()
    exp = client.get_experiment_by_name(NAME)
    (parent,) = [  # the flow run's runs: the parent, its stage runs and the trials it ran; the parent has no parent
        r
        for r in client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`tuneflow.prefect_flow_run_id` = '{run.id}'"
        )
        if "mlflow.parentRunId" not in r.data.tags
    ]
    assert parent.data.tags["tuneflow.study"] == NAME
    children = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`tuneflow.stage` = 'trial'",
    )
    assert sorted(int(r.data.tags["tuneflow.trial"]) for r in children) == sorted(t.number for t in trials)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" and r.data.tags["tuneflow.trial_state"] == "COMPLETE" for r in children)
    by_process = {}
    for r in children:
        by_process.setdefault(r.data.tags["tuneflow.prefect_flow_run_id"], []).append(
            int(r.data.tags["tuneflow.trial"])
        )
    assert set(by_process) == {str(run.id), str(helper.id)}, by_process  # both processes ran trials
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert "search/trials.json" in artifacts
    storage_tag = parent.data.tags["tuneflow.study_storage"]
    assert storage_tag.startswith("postgresql+psycopg://") and PG_PASSWORD not in storage_tag
    assert parent.data.tags["tuneflow.tuned_from_trial"] == str(study.best_trial.number)
    # the gate: the best model registered as a version of the model, tagged with the study and its trial
    tuned = [v for v in client.search_model_versions(f"name='{MODEL}'") if v.tags.get("tuneflow.study") == NAME]
    assert [v.tags["tuneflow.tuned_from_trial"] for v in tuned] == [str(study.best_trial.number)]
    print(
        f"tune {run.name} on {team.worker_of(run.id)} ran trials {sorted(by_process[str(run.id)])}, "
        f"tune-worker {helper.name} on {team.worker_of(helper.id)} ran {sorted(by_process[str(helper.id)])}, "
        f"{len(everything) - len(trials)} surplus; {time.monotonic() - t0:.0f} s"
    )
