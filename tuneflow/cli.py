"""The ``tuneflow`` command: run the retrain flow, list registered models, batch-score a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneflow.runtime import configure_environment

DEFAULT_CONFIG = "configs/sms-spam.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneflow", description="Retrain, review and use fine-tuned language models.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the retrain flow once (validate, tokenize, fine-tune, evaluate, register)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline config YAML (default: {DEFAULT_CONFIG})")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set train.epochs=1 (repeatable)")

    models = sub.add_parser("models", help="list registered model versions, their aliases and scores")
    models.add_argument("name", nargs="?", help="registered model name (default: all)")

    pred = sub.add_parser("predict", help="batch-score a CSV/JSONL/Parquet file with a registered model")
    pred.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION, e.g. sms-spam-classifier@champion")
    pred.add_argument("--input", required=True, type=Path)
    pred.add_argument("--output", required=True, type=Path, help="CSV to write (input columns + label, score, model_version)")
    pred.add_argument("--text-column", default="text")
    pred.add_argument("--batch-size", type=int, default=64)

    ui = sub.add_parser("ui", help="open the MLflow UI on the local store (mlruns/)")
    ui.add_argument("--port", type=int, default=5000)
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from tasks.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows.retrain import retrain
    from tasks.data import DataError
    from tasks.train import ModelError

    try:
        result = retrain(config, config_file=str(args.config))
    except (DataError, ModelError) as exc:
        print(f"\nerror: retrain stopped before training; nothing was registered.\n{exc}", file=sys.stderr)
        return 2
    m = result["metrics"]
    print("\n=== tuneflow retrain finished ===")
    print(f"eval accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    print(f"tokenization: {'cache hit (not re-tokenized)' if result['tokenize_cache_hit'] else 'computed and cached'}")
    print(f"MLflow run:   {result['run_url']}  (start the UI with: tuneflow ui)")
    if "version" in result:
        print(f"registered:   {config.registry.model_name} version {result['version']} -> {result['model_uri']}")
        print(f"decision:     {'PROMOTED to champion' if result['promoted'] else 'not promoted'}: {result['reason']}")
        print(f"champion:     models:/{config.registry.model_name}@champion")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from tasks.register import list_versions
    from tasks.tracking import configure_tracking

    configure_tracking()
    try:
        rows = list_versions(args.name)
    except MlflowException as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if not rows:
        print("no registered models yet; run: tuneflow run")
        return 0
    cols = ["name", "version", "aliases", "metric", "score", "decision", "data_digest", "created"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tasks.data import DataError
    from tasks.predict import PredictError, predict_file
    from tasks.tracking import configure_tracking

    configure_tracking()
    try:
        out = predict_file(args.model, args.input, args.output, args.text_column, args.batch_size)
    except (DataError, PredictError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out.rows} predictions with {out.model_uri} (version {out.version}) to {args.output}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import os

    from tasks.tracking import configure_tracking

    uri = configure_tracking()
    print(f"MLflow UI on http://127.0.0.1:{args.port} for {uri} (Ctrl-C to stop)")
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_environment()
    return {"run": _cmd_run, "models": _cmd_models, "predict": _cmd_predict, "ui": _cmd_ui}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
