"""The declared deployments agree with the configs and the flows, without a server; the deployed
retrain against Prefect's test harness: the "nothing new" path of a queued triggered run and the
per-model slot (a global concurrency limit) it waits for."""

from __future__ import annotations

import importlib.util
import inspect
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import make_rows, tiny_config_dict

REPO = Path(__file__).resolve().parents[1]


def _entry(entrypoint: str):
    file, attr = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(f"_spec_{Path(file).stem}", REPO / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)


def test_prefect_yaml_matches_the_configs_and_the_flows():
    from prefect.events import DeploymentEventTrigger

    from tuneflow.config import load_config
    from tuneflow.watch import DEGRADED_EVENT, EVENT, model_resource, resource_id

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    # a deployment is named within its flow: key them by "flow/deployment", as Prefect does
    entries = {d["entrypoint"]: _entry(d["entrypoint"]) for d in spec["deployments"]}
    by_flow = {f"{entries[d['entrypoint']].name}/{d['name']}": d for d in spec["deployments"]}
    assert len(by_flow) == len(spec["deployments"])
    review_deps = {k: by_flow.pop(k) for k in [k for k in by_flow if k.startswith("review")]}
    tune_deps = {k: by_flow.pop(k) for k in [k for k in by_flow if k.startswith("tune")]}
    deployments = {d["name"]: d for d in by_flow.values()}
    assert set(deployments) == {"scheduled", "on-new-data", "on-decay", "batch", "landing"}
    flows = {name: _entry(d["entrypoint"]) for name, d in deployments.items()}
    assert {n: f.name for n, f in flows.items()} == {
        "scheduled": "retrain",
        "on-new-data": "retrain",
        "on-decay": "retrain",
        "batch": "predict",
        "landing": "watch",
    }
    # the review flows of the model: named after it, as tuneflow serve names them (flows.review.deployment_name)
    model = load_config(REPO / deployments["scheduled"]["parameters"]["config_path"]).registry.model_name
    assert set(review_deps) == {f"review/{model}", f"review-timeouts/{model}"}
    assert review_deps[f"review-timeouts/{model}"]["parameters"] == {"model_name": model}
    # tune and its workers: named after the config, which has a search section (the tune flow finds its workers'
    # deployment as tune-worker/<config name>)
    tuned = load_config(REPO / deployments["scheduled"]["parameters"]["config_path"])
    assert set(tune_deps) == {f"tune/{tuned.name}", f"tune-worker/{tuned.name}"} and tuned.search is not None
    assert tune_deps[f"tune/{tuned.name}"]["parameters"] == deployments["scheduled"]["parameters"]
    for key, d in (review_deps | tune_deps).items():
        params = inspect.signature(entries[d["entrypoint"]].fn).parameters
        assert set(d["parameters"]) <= set(params), key
    for name, d in deployments.items():
        params = inspect.signature(flows[name].fn).parameters
        assert set(d["parameters"]) <= set(params), name
        for t in d.get("triggers", []):
            assert set(t["parameters"]) <= set(params), name
    cfg = load_config(REPO / deployments["scheduled"]["parameters"]["config_path"])
    assert deployments["scheduled"]["schedules"] == [{"cron": cfg.schedule.cron, "timezone": cfg.schedule.timezone}]
    (trigger,) = deployments["on-new-data"]["triggers"]
    parsed = DeploymentEventTrigger.model_validate({k: v for k, v in trigger.items() if k != "type"})
    assert parsed.expect == {EVENT}
    assert trigger["match"] == {"prefect.resource.id": resource_id(cfg.name)}
    assert deployments["batch"]["parameters"]["model"] == f"{cfg.registry.model_name}@champion"
    # monitoring's decay event retrains the same model, with the event's payload (the decay) as the trigger
    (decay,) = deployments["on-decay"]["triggers"]
    parsed = DeploymentEventTrigger.model_validate({k: v for k, v in decay.items() if k != "type"})
    assert parsed.expect == {DEGRADED_EVENT}
    assert decay["match"] == {"prefect.resource.id": model_resource(cfg.registry.model_name)}
    assert decay["parameters"]["trigger"] == "{{ event.payload }}" and "only_if_new_data" not in decay["parameters"]


def test_serve_builds_the_deployments_from_the_config(tmp_path, tiny_model_dir):
    from tuneflow.flows.serve import build_deployments

    raw = tiny_config_dict(Path("unused"), tiny_model_dir, schedule={"cron": "0 3 * * 1", "timezone": "Europe/Berlin"})
    raw["data"] = {"landing": str(tmp_path / "landing"), "labels": ["ham", "spam"]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    deployments, _ = build_deployments([str(path)])
    by_name = {d.name: d for d in deployments}
    assert [d.name for d in deployments if d.flow_name.startswith("review")] == ["tiny-clf", "tiny-clf"]
    by_name = {d.name: d for d in deployments if not d.flow_name.startswith("review")}
    assert set(by_name) == {"scheduled", "on-new-data", "on-decay", "batch"}
    (decay,) = by_name["on-decay"].triggers
    assert decay.expect == {"tuneflow.champion.degraded"}
    assert decay.match.model_dump() == {"prefect.resource.id": "tuneflow.model.tiny-clf"}
    assert by_name["scheduled"].schedules[0].schedule.cron == "0 3 * * 1"
    assert by_name["scheduled"].schedules[0].schedule.timezone == "Europe/Berlin"
    (trigger,) = by_name["on-new-data"].triggers
    assert trigger.match.model_dump() == {"prefect.resource.id": "tuneflow.dataset.tiny"} and trigger.expect == {
        "tuneflow.data.arrived"
    }
    assert (
        trigger.parameters["trigger"] == "{{ event.payload }}"
        and by_name["on-new-data"].parameters["only_if_new_data"] is True
    )
    assert by_name["batch"].parameters == {"model": "tiny-clf@champion"}
    # Without a schedule section there is no scheduled deployment; a file config has no trigger either.
    raw.pop("schedule")
    raw["data"] = {"path": str(tmp_path / "d.csv"), "labels": ["ham", "spam"]}
    path.write_text(yaml.safe_dump(raw))
    assert [d.name for d in build_deployments([str(path)])[0]] == ["tiny-clf", "tiny-clf", "batch"]


def test_a_triggered_run_with_nothing_new_completes_without_training(prefect_harness, workdir, tiny_model_dir):
    """ "Nothing new" means "not yet trained": an empty incoming/ is not enough while no version was trained on
    the accepted data (a retrain that failed after its gate accepted the batches must not lose its trigger)."""
    from mlflow import MlflowClient

    from tuneflow.flows.retrain import retrain

    landing = workdir / "landing"
    (landing / "incoming").mkdir(parents=True)
    (landing / "accepted").mkdir()
    make_rows(60).to_csv(landing / "accepted" / "old.csv", index=False)
    (landing / "incoming" / "half-written.csv.part").write_text("text,la")
    raw = tiny_config_dict(Path("unused"), tiny_model_dir)
    raw["data"] = {"landing": str(landing), "labels": ["ham", "spam"]}
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    trigger = {"dataset": "tiny", "landing": str(landing), "files": [{"name": "x.csv", "sha256": "0" * 64, "size": 1}]}

    # accepted data that no version was trained on (as after a failed retrain): the triggered run trains
    first = retrain(str(path), only_if_new_data=True, trigger=trigger)
    assert first["status"] == "trained" and first["version"] == "1"
    # the same accepted data again, nothing in incoming/: nothing new
    out = retrain(str(path), only_if_new_data=True, trigger=trigger)
    assert out == {"status": "nothing new", "model_name": "tiny-clf"}
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='tiny-clf'")] == ["1"]


def test_the_slot_of_a_model_is_named_after_it():
    from tuneflow.flows.retrain import limit_name

    assert limit_name("m") == "retrain-m"
    assert limit_name("sms-clf") != limit_name("sms-clf-2")


def test_the_slot_limit_is_created_once_and_an_existing_one_is_kept(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from tuneflow.flows.retrain import ensure_concurrency_limit

    new, existing = f"retrain-new-{uuid.uuid4().hex[:8]}", f"retrain-old-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):
            client.read_global_concurrency_limit_by_name(new)
        ensure_concurrency_limit(new)
        created = client.read_global_concurrency_limit_by_name(new)
        assert created.limit == 1 and created.active
        ensure_concurrency_limit(new, limit=3)  # a second run of the same model: nothing changes
        again = client.read_global_concurrency_limit_by_name(new)
        assert (again.id, again.limit) == (created.id, 1)
        assert [g.name for g in client.read_global_concurrency_limits(limit=200)].count(new) == 1

        # An operator raised a model's limit by hand: the flow keeps it.
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=existing, limit=4))
        ensure_concurrency_limit(existing)
        assert client.read_global_concurrency_limit_by_name(existing).limit == 4


def test_the_dockerfile_installs_what_make_run_installs_and_the_container_pools_use_its_image():
    """The Dockerfile repeats the Makefile's pinned torch and sample assets; the container work pools of
    prefect.yaml name a tuneflow image and run from the image's checkout (not exercised: no container engine)."""
    make = (REPO / "Makefile").read_text()
    docker = (REPO / "Dockerfile").read_text()
    for var in ("TORCH", "ASSETS"):
        (in_make,) = [line.split(":=", 1)[1].strip() for line in make.splitlines() if line.startswith(f"{var} ")]
        assert f'ARG {var}="{in_make}"' in docker, f"Dockerfile's {var} differs from the Makefile's ({in_make})"
    pools = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["definitions"]["work_pools"]
    for name in ("tuneflow-docker", "tuneflow-kubernetes"):
        job = pools[name]["job_variables"]
        assert pools[name]["name"] == name and job["image"].split("/")[-1].startswith("tuneflow:")
        assert job["env"]["TUNEFLOW_HOME"] == "/opt/tuneflow" and "WORKDIR /opt/tuneflow" in docker
        assert job["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
