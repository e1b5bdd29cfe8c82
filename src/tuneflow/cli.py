"""The ``tuneflow`` command: run the retrain flow, review the registry (promote, roll back, compare), batch-score."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneflow.runtime import configure_environment

DEFAULT_CONFIG = "configs/sms-spam.yaml"


def _add_configs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        default=[],
        metavar="PATH",
        help=f"pipeline config YAML (repeatable; default: {DEFAULT_CONFIG})",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneflow", description="Retrain, review and use fine-tuned language models.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the retrain flow once (validate, tokenize, fine-tune, evaluate, register)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline config YAML (default: {DEFAULT_CONFIG})")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=1 (repeatable)",
    )
    run.add_argument(
        "--force", action="store_true", help="retrain even if a version was trained on exactly this already"
    )

    tune = sub.add_parser(
        "tune",
        help="search the settings (Optuna: the config's search section), write <name>.tuned.yaml and put the best "
        "model through the gate",
    )
    tune.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline config YAML (default: {DEFAULT_CONFIG})")
    tune.add_argument("--trials", type=int, help="trials of the study in all (default: search.trials)")
    tune.add_argument(
        "--timeout", type=float, metavar="MIN", help="minutes after which no new trial starts (search.timeout_minutes)"
    )
    tune.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes running trials at once (search.workers): above 1, runs of the deployment tune-worker/<name> "
        "on the Prefect server of PREFECT_API_URL; without a server, trials run one at a time",
    )

    models = sub.add_parser("models", help="list registered model versions, their aliases and scores")
    models.add_argument("name", nargs="?", help="registered model name (default: all)")
    models.add_argument(
        "--history", action="store_true", help="show the champion history of NAME (time, from -> to, by, reason)"
    )

    prom = sub.add_parser(
        "promote", help="make a version champion by hand (re-scores it and the champion on the current eval split)"
    )
    prom.add_argument("name", help="registered model name")
    prom.add_argument("version", help="version number to promote")
    prom.add_argument("--reason", required=True, help="why (recorded in the champion history)")
    prom.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config whose data gives the eval split (default: {DEFAULT_CONFIG})"
    )
    prom.add_argument("--force", action="store_true", help="promote even a version that failed or lacks validation")

    rb = sub.add_parser("rollback", help="move champion back to the previous champion recorded in the history")
    rb.add_argument("name", help="registered model name")
    rb.add_argument("--reason", default="", help="why (recorded in the champion history)")

    cmp_ = sub.add_parser("compare", help="two versions' metrics side by side, recomputed on the current eval split")
    cmp_.add_argument("name", help="registered model name")
    cmp_.add_argument("v1")
    cmp_.add_argument("v2")
    cmp_.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config whose data gives the eval split (default: {DEFAULT_CONFIG})"
    )

    rev = sub.add_parser(
        "review",
        help="challengers waiting for a person's decision (registry.approval: required): list, approve, reject",
    )
    rsub = rev.add_subparsers(dest="action", required=True)
    rl = rsub.add_parser("list", help="waiting reviews with their flow run's state (overdue ones are rejected)")
    rl.add_argument("name", nargs="?", help="registered model name (default: all)")
    rl.add_argument("--all", action="store_true", help="also the decided ones (approved, rejected, superseded)")
    for action, what in (("approve", "make it champion"), ("reject", "keep the champion")):
        ra = rsub.add_parser(action, help=f"{action} a waiting challenger ({what}); resumes the run that waits for it")
        ra.add_argument("name", help="registered model name")
        ra.add_argument("version", help="the waiting version")
        ra.add_argument("--reviewer", required=True, help="your name (recorded; Prefect OSS records no identity)")
        ra.add_argument("--comment", default="", help="why (recorded in the champion history and the model card)")
        ra.add_argument(
            "--wait", type=float, default=180.0, metavar="S", help="how long to wait for the run to apply it (180)"
        )

    ver = sub.add_parser(
        "verify",
        help="check that a registered version is safe to load (tuneflow's lineage, transformers weights as "
        "safetensors, no code or pickles, only tuneflow's requirements); exit 2 when not",
    )
    ver.add_argument("model", help="NAME@ALIAS or NAME/VERSION, e.g. sms-spam-classifier@champion")
    ver.add_argument(
        "--download",
        type=Path,
        metavar="DIR",
        help="keep the checked files in DIR (new or empty) with a record of the version and each file's SHA-256; "
        "serve exactly them with 'tuneflow serve-model DIR'",
    )

    sm = sub.add_parser(
        "serve-model",
        help="serve a version over HTTP with MLflow's scoring server, from the one folder tuneflow downloaded and "
        "checked, in the installed environment (nothing pip-installed)",
    )
    sm.add_argument(
        "model", help="NAME@ALIAS, NAME/VERSION, or a folder kept by 'tuneflow verify --download' (checked again)"
    )
    sm.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    sm.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")

    pred = sub.add_parser(
        "predict", help="batch-score a CSV/JSONL/Parquet file or a folder with a registered model (Prefect flow)"
    )
    pred.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION, e.g. sms-spam-classifier@champion")
    pred.add_argument("--input", required=True, type=Path, help="a data file, or a folder of them")
    pred.add_argument(
        "--output",
        required=True,
        type=Path,
        help="CSV to write (input columns + label, score, model_version); a folder when --input is a folder",
    )
    pred.add_argument("--text-column", default="text")
    pred.add_argument("--batch-size", type=int, default=64)

    srv = sub.add_parser(
        "serve",
        help="serve the deployments (schedule, new-data trigger, batch predict) and watch landing zones; "
        "needs a Prefect server (PREFECT_API_URL)",
    )
    _add_configs(srv)
    srv.add_argument(
        "--no-watch", action="store_true", help="do not watch the landing zones (events come from elsewhere)"
    )

    al = sub.add_parser(
        "alerts",
        help="create the alert automations (failed retrain, quarantined batch) and their webhook block, and the "
        "automation that marks flow runs whose heartbeats stop Crashed, on the Prefect server (PREFECT_API_URL); "
        "tuneflow serve creates the alerts by itself, team mode runs this once",
    )
    _add_configs(al)
    al.add_argument("--send-test", action="store_true", help="also post a test notification through the block")

    mon = sub.add_parser(
        "monitor",
        help="the champion on each new batch and the drift of each batch, as recorded by monitoring (oldest first)",
    )
    mon.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline config YAML (default: {DEFAULT_CONFIG})")
    mon.add_argument("--last", type=int, default=20, help="show the last N points (default: 20)")
    mon.add_argument("--json", action="store_true", help="print the points as JSON lines")

    ui = sub.add_parser("ui", help="open the MLflow UI on the local store (mlruns/)")
    ui.add_argument("--port", type=int, default=5000)
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from tuneflow.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.force and (same := _unchanged_without_prefect(config)) is not None:
        _print_unchanged(same)
        return 0
    from tuneflow.data import DataError
    from tuneflow.flows.retrain import model_slot, retrain_once, start_prefect_while_importing
    from tuneflow.models import ModelError
    from tuneflow.train_common import TrainingError

    start_prefect_while_importing()
    try:
        with model_slot(config.registry.model_name):  # as deployed runs: one retrain of a model at a time
            result = retrain_once(config, config_file=str(args.config), force=args.force)
    except (DataError, ModelError) as exc:
        print(f"\nerror: retrain stopped before training; nothing was registered.\n{exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"\nerror: training failed; nothing was registered.\n{exc}", file=sys.stderr)
        return 2
    if result.get("status") == "unchanged":
        _print_unchanged(result)
        return 0
    m = result["metrics"]
    print("\n=== tuneflow retrain finished ===")
    from tuneflow.kinds.catalog import facts_of

    shown = facts_of(config.kind).shown_metrics
    print("eval " + ", ".join(f"{k} {m[k]:.4f}" for k in shown if k in m))
    print(f"tokenization: {'cache hit (not re-tokenized)' if result['tokenize_cache_hit'] else 'computed and cached'}")
    print(f"MLflow run:   {result['run_url']}  (start the UI with: tuneflow ui)")
    if "version" in result:
        print(f"registered:   {config.registry.model_name} version {result['version']} -> {result['model_uri']}")
        print(f"decision:     {'PROMOTED to champion' if result['promoted'] else 'not promoted'}: {result['reason']}")
        print(f"champion:     models:/{config.registry.model_name}@champion")
        if result.get("review") == "waiting":
            print(
                f"review:       v{result['version']} waits for a person: tuneflow review approve|reject "
                f"{config.registry.model_name} {result['version']} --reviewer NAME --comment ..."
            )
        elif result.get("review"):
            print(f"review:       {result['review']}")
    if result.get("quarantined"):
        print(
            f"WARNING: {len(result['quarantined'])} batch(es) quarantined and NOT trained on: "
            f"{', '.join(result['quarantined'])} (reports next to them in {config.data.landing}/quarantine/)",
            file=sys.stderr,
        )
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from tuneflow.config import ConfigError, load_config
    from tuneflow.models import ModelError

    try:
        config = load_config(args.config)
        from tuneflow.search import check_search
        from tuneflow.tracking import configure_tracking

        check_search(config, configure_tracking(), args.trials, args.timeout, args.workers)  # before any training
    except (ConfigError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tuneflow.data import DataError
    from tuneflow.flows.retrain import start_prefect_while_importing
    from tuneflow.flows.tune import tune
    from tuneflow.train_common import TrainingError

    start_prefect_while_importing()
    try:
        result = tune(str(args.config), trials=args.trials, timeout_minutes=args.timeout, workers=args.workers)
    except (DataError, ModelError) as exc:
        print(f"\nerror: tune stopped before training; nothing was registered.\n{exc}", file=sys.stderr)
        return 2
    except (ConfigError, TrainingError) as exc:  # SearchError: e.g. no trial completed
        print(f"\nerror: the search gave no model; nothing was registered.\n{exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {state.lower()}" for state, n in result["trials"].items())
    print("\n=== tuneflow tune finished ===")
    print(f"study:        {result['study']} ({counts}; {result['ran']} run now) in {result['storage']}")
    print(f"best trial:   {result['best_trial']}: {result['best_value']:.4f} with {result['best_settings']}")
    print(f"tuned config: {result['tuned_config']}  (tuneflow run --config {result['tuned_config']})")
    print(f"MLflow run:   {result['run_url']}  (start the UI with: tuneflow ui)")
    if "version" in result:
        print(f"registered:   {config.registry.model_name} version {result['version']} -> {result['model_uri']}")
        print(f"decision:     {'PROMOTED to champion' if result['promoted'] else 'not promoted'}: {result['reason']}")
    return 0


def _unchanged_without_prefect(config) -> dict | None:
    """Nothing changed, nothing paid: the flow's first check, by the same functions, before Prefect's server starts
    or the training stack is imported. A version trained on exactly these input files (a landing zone with an
    empty ``incoming/``), config, base model and tuneflow version: its answer, recorded as an MLflow run.
    None when the flow must run (no such version, a batch waiting in ``incoming/``, no registry, or anything
    the flow should report itself)."""
    if not config.registry.enabled:
        return None
    from tuneflow.registry_base import INPUT_FINGERPRINT_TAG
    from tuneflow.tracking import configure_tracking
    from tuneflow.unchanged import input_fingerprint, record_unchanged_run, same_version

    try:
        fp = input_fingerprint(config)
        if fp is None:
            return None
        configure_tracking()
        same = same_version(config, fp, INPUT_FINGERPRINT_TAG)
    except Exception:  # noqa: BLE001 - e.g. a base model that does not resolve: the flow says it properly
        return None
    return None if same is None else record_unchanged_run(config, str(same.version), fp)


def _print_unchanged(result: dict) -> None:
    print(f"\n=== tuneflow retrain: {result['reason']} ===")
    print(f"version:      {result['model_uri']}")
    print(f"MLflow run:   {result['run_url']}")


def _table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def _cmd_models(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from tuneflow.registry import list_versions
    from tuneflow.review import history_rows
    from tuneflow.tracking import configure_tracking

    configure_tracking()
    if args.history and not args.name:
        print("error: --history needs a model name. Fix: tuneflow models NAME --history", file=sys.stderr)
        return 2
    try:
        if args.history:
            rows = history_rows(args.name)
            if not rows:
                print(f"no champion moves recorded for {args.name} yet")
                return 0
            _table(rows, ["time", "move", "action", "by", "reason"])
            return 0
        rows = list_versions(args.name)
    except MlflowException as exc:
        print(f"error: {exc.message}. Fix: check the name with 'tuneflow models'", file=sys.stderr)
        return 2
    if not rows:
        print("no registered models yet; run: tuneflow run")
        return 0
    _table(rows, ["name", "version", "aliases", "metric", "score", "decision", "data_digest", "created"])
    return 0


def _review(fn, *a, **kw):
    """Run a review action; returns (result, exit code). Refusals are exit 2 with the message."""
    from mlflow.exceptions import MlflowException

    from tuneflow.data import DataError
    from tuneflow.registry_base import RegistryError

    try:
        return fn(*a, **kw), 0
    except (RegistryError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except MlflowException as exc:
        print(f"error: {exc.message}. Fix: check the name with 'tuneflow models'", file=sys.stderr)
    return None, 2


def _load(path: str):
    from tuneflow.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _cmd_promote(args: argparse.Namespace) -> int:
    from tuneflow.review import promote
    from tuneflow.tracking import configure_tracking

    cfg = _load(args.config)
    if cfg is None:
        return 2
    configure_tracking()
    out, rc = _review(promote, cfg, args.name, args.version, args.reason, args.force, args.config)
    if rc:
        return rc
    print(f"scored on the current eval split ({out.eval_source}):\n{out.table}\n")
    print(
        f"champion of {args.name}: v{out.move.from_version or '-'} -> v{out.move.to_version} "
        f"({out.move.by}:{out.move.actor}): {out.move.reason}"
    )
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from tuneflow.review import rollback
    from tuneflow.tracking import configure_tracking

    configure_tracking()
    move, rc = _review(rollback, args.name, args.reason)
    if rc:
        return rc
    print(
        f"champion of {args.name} rolled back: v{move.from_version} -> v{move.to_version} "
        f"({move.by}:{move.actor}): {move.reason}"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tuneflow.review import compare
    from tuneflow.tracking import configure_tracking

    cfg = _load(args.config)
    if cfg is None:
        return 2
    configure_tracking()
    out, rc = _review(compare, cfg, args.name, args.v1, args.v2, args.config)
    if rc:
        return rc
    table, source = out
    print(f"{args.name} v{args.v1} vs v{args.v2}, scored on the current eval split ({source}):\n{table}")
    return 0


def _cmd_review(args: argparse.Namespace) -> int:
    import os

    from tuneflow.approval import review_rows, reviews
    from tuneflow.tracking import configure_tracking

    configure_tracking()
    server = bool(os.environ.get("PREFECT_API_URL"))
    if args.action != "list":
        return _decide_review(args, server)
    if _close_overdue(args.name, server):
        return 2
    items, rc = _review(reviews, args.name, None if args.all else "waiting")
    if rc:
        return rc
    if not items:
        print("no reviews waiting" if not args.all else "no reviews recorded")
        return 0
    ids = [r.flow_run_id for r in items if r.flow_run_id]
    if server and ids:
        from tuneflow.flows.review import run_states

        states = run_states(ids)
    else:
        states = {}
    rows = review_rows(items, states)
    _table(rows, list(rows[0]))
    orphans = [r for r in items if r.state == "waiting" and states.get(r.flow_run_id) in ("gone", "Crashed", "Failed")]
    for r in orphans:
        print(
            f"{r.name} v{r.version}: its flow run is {states[r.flow_run_id]}; close it with 'tuneflow review "
            f"approve|reject {r.name} {r.version} --reviewer NAME' (decided here, in the registry)"
        )
    return 0


def _close_overdue(name: str | None, server: bool) -> int:
    """Reject the reviews past their deadline (and resume their runs, which then end); returns an exit code."""
    from tuneflow.approval import close_overdue

    closed, rc = _review(close_overdue, name)
    if rc:
        return rc
    for outcome in closed:
        if server:
            from tuneflow.flows.review import end_timed_out_run

            end_timed_out_run(outcome.review)
        print(f"timed out, rejected: {outcome.review.name} v{outcome.review.version} ({outcome.review.comment})")
    return 0


def _decide_review(args: argparse.Namespace, server: bool) -> int:
    """approve | reject: send the decision to the run that waits (it applies it), or, with no run waiting (none
    recorded, gone, crashed), apply it here."""
    import time

    from tuneflow.approval import check_decidable, decide, read_review
    from tuneflow.registry import get_version

    verdict = args.action
    if _close_overdue(args.name, server):
        return 2
    review, rc = _review(check_decidable, args.name, args.version)
    if rc:
        return rc
    if not args.reviewer.strip():
        print('error: a decision needs the reviewer\'s name. Fix: pass --reviewer "NAME"', file=sys.stderr)
        return 2
    if review.flow_run_id:
        if not server:
            print(
                f"error: {args.name} v{args.version} waits in flow run {review.flow_run_id} on a Prefect server; "
                "nothing was decided. Fix: set PREFECT_API_URL to that server and run this again",
                file=sys.stderr,
            )
            return 2
        from tuneflow.flows.review import RunNotWaiting, resume

        try:
            resume(review.flow_run_id, verdict, args.reviewer, args.comment)
        except RunNotWaiting as exc:
            print(f"{exc}: deciding here, in the registry")
        else:
            print(f"sent '{verdict}' to flow run {review.flow_run_id}; waiting for it to apply the decision ...")
            deadline = time.monotonic() + args.wait
            while time.monotonic() < deadline:
                now = read_review(get_version(args.name, args.version))
                if now is not None and now.state != "waiting":
                    return _print_review(now)
                time.sleep(2)
            print(f"the run has not applied it within {args.wait:.0f} s; 'tuneflow review list --all' shows it later")
            return 0
    outcome, rc = _review(decide, args.name, args.version, verdict, args.reviewer, args.comment, via="tuneflow review")
    if rc:
        return rc
    if server and outcome.superseded:
        from tuneflow.flows.review import end_runs

        end_runs(outcome.superseded)
    for r in outcome.superseded:
        print(f"superseded: {r.name} v{r.version} ({r.comment})")
    return _print_review(outcome.review)


def _print_review(r) -> int:
    from tuneflow.registry import champion_version

    if r.state not in ("approved", "rejected"):
        print(f"error: {r.name} v{r.version} was not decided: {r.state} ({r.comment}); nothing moved", file=sys.stderr)
        return 2
    print(
        f"{r.name} v{r.version} {r.state} by {r.reviewer}: {r.comment or '(no comment)'}; "
        f"champion is v{champion_version(r.name) or '-'}"
    )
    return 0


def _registry_unreachable(ref: str, exc) -> int:
    from tuneflow.runtime import redact_url
    from tuneflow.tracking import configure_tracking

    print(
        f"error: could not read {ref} from the registry at {redact_url(configure_tracking())}: "
        f"{exc.message.splitlines()[0][:300]}. Fix: check that the tracking server is reachable from here "
        "(MLFLOW_TRACKING_URI, and its credentials), then check the name with 'tuneflow models'",
        file=sys.stderr,
    )
    return 2


def _cmd_verify(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from tuneflow.predict import PredictError, resolve_model
    from tuneflow.registry_base import RegistryError
    from tuneflow.tracking import configure_tracking
    from tuneflow.trust import RECORD, checked_version, keep_checked

    configure_tracking()
    try:
        mv = resolve_model(args.model)
        if args.download:
            folder = keep_checked(mv, args.download, args.model)
        else:
            with checked_version(mv):
                pass
    except (PredictError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        return _registry_unreachable(args.model, exc)
    print(
        f"{mv.name} v{mv.version}: safe to load (transformers weights as safetensors, no code, no pickles, "
        "only tuneflow's requirements)"
    )
    if args.download:
        print(f"kept in {folder} (version and file digests in {RECORD}); serve it with: tuneflow serve-model {folder}")
    return 0


def _cmd_serve_model(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from tuneflow.predict import PredictError, resolve_model
    from tuneflow.registry_base import RegistryError
    from tuneflow.serving import serve_folder
    from tuneflow.tracking import configure_tracking
    from tuneflow.trust import check_kept, checked_version

    url = f"http://{args.host}:{args.port}"
    try:
        if Path(args.model).is_dir():
            record = check_kept(Path(args.model))
            print(f"serving {record['model']} v{record['version']} from {args.model} (checked again) on {url}")
            return serve_folder(Path(args.model), args.host, args.port)
        configure_tracking()
        mv = resolve_model(args.model)
        with checked_version(mv) as local:  # served from the folder just checked, removed when the server exits
            print(f"serving {mv.name} v{mv.version} ({args.model} when it started; checked) on {url}")
            return serve_folder(local, args.host, args.port)
    except (PredictError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        return _registry_unreachable(args.model, exc)


def _cmd_predict(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from tuneflow.data import DataError
    from tuneflow.flows.predict import predict
    from tuneflow.predict import PredictError
    from tuneflow.registry_base import RegistryError

    try:
        out = predict(args.model, str(args.input), str(args.output), args.text_column, args.batch_size)
    except (DataError, PredictError, RegistryError) as exc:  # RegistryError: e.g. a version refused as untrusted
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:  # the tracking server does not answer
        return _registry_unreachable(args.model, exc)
    labels = ", ".join(f"{k} {v}" for k, v in out["label_counts"].items())
    print(f"wrote {out['rows']} predictions with {out['model_uri']} (version {out['version']}) to {args.output}")
    counts = f"labels: {labels}; " if labels else ""  # a generative model has no labels to count
    print(f"{counts}{out['ms_per_row']:.2f} ms/row; MLflow run: {out['run_url']}")
    for m in out.get("monitoring", []):
        if m["status"] == "degraded":
            print(
                f"warning: the inputs of {m['file']} drifted from the model's training data: {'; '.join(m['reasons'])}"
            )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from tuneflow.config import ConfigError

    if not os.environ.get("PREFECT_API_URL"):
        # Without a server, Prefect would start a temporary one that dies with this process: schedules,
        # triggers and the UI would vanish with it.
        print(
            "error: tuneflow serve needs a running Prefect server. Fix: run `prefect server start` in another "
            "terminal, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`",
            file=sys.stderr,
        )
        return 2
    from tuneflow.flows.serve import serve

    try:
        serve(args.configs or [DEFAULT_CONFIG], watch=not args.no_watch)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_alerts(args: argparse.Namespace) -> int:
    import os

    from tuneflow.config import ConfigError, load_config

    if not os.environ.get("PREFECT_API_URL"):
        print(
            "error: alerts live on a Prefect server. Fix: export PREFECT_API_URL=http://<server>:4200/api",
            file=sys.stderr,
        )
        return 2
    try:
        configs = [load_config(p) for p in args.configs or [DEFAULT_CONFIG]]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tuneflow.flows.alerts import block_name, ensure_alerts, ensure_crash_detection

    print(f"{ensure_crash_detection()!r}: a flow run whose heartbeats stop is marked Crashed")
    code = 0
    for cfg in configs:
        names = ensure_alerts(cfg)
        if not names:
            print(
                f"{cfg.name}: no webhook URL: set {cfg.alerts.webhook_url_env} or alerts.webhook_url", file=sys.stderr
            )
            code = 2
            continue
        print(f"{cfg.name}: {', '.join(repr(n) for n in names)} -> block {block_name(cfg)}")
        if args.send_test:
            from prefect.blocks.notifications import CustomWebhookNotificationBlock

            CustomWebhookNotificationBlock.load(block_name(cfg)).notify(
                body=f"test notification from tuneflow alerts for {cfg.name}", subject="tuneflow: test"
            )
            print(f"{cfg.name}: test notification sent")
    return code


def _cmd_monitor(args: argparse.Namespace) -> int:
    from tuneflow.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tuneflow.monitor import find_monitoring_run, series_of
    from tuneflow.reporting import monitor_table
    from tuneflow.tracking import configure_tracking, run_url

    configure_tracking()
    name = cfg.registry.model_name
    run = find_monitoring_run(name)
    if run is None:
        print(f"{name} has not been monitored yet: monitoring starts when the landing-zone gate accepts a batch")
        return 0
    points = series_of(run.data.tags)[-args.last :]
    if args.json:
        for p in points:
            print(p.to_json())
        return 0
    print(monitor_table(points, cfg.monitor.max_drop))
    print(f"monitoring run: {run_url(run.info.experiment_id, run.info.run_id)}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import os

    from tuneflow.tracking import configure_tracking

    uri = configure_tracking()
    from tuneflow.runtime import redact_url

    print(f"MLflow UI on http://127.0.0.1:{args.port} for {redact_url(uri)} (Ctrl-C to stop)")
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
        ],
    )
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_environment()
    commands = {
        "run": _cmd_run,
        "tune": _cmd_tune,
        "models": _cmd_models,
        "promote": _cmd_promote,
        "rollback": _cmd_rollback,
        "compare": _cmd_compare,
        "review": _cmd_review,
        "predict": _cmd_predict,
        "verify": _cmd_verify,
        "serve-model": _cmd_serve_model,
        "serve": _cmd_serve,
        "alerts": _cmd_alerts,
        "monitor": _cmd_monitor,
        "ui": _cmd_ui,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
