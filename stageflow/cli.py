"""``stageflow``: the command line, a thin door over the packages' functions.

Exit codes (DESIGN.md): 0 success; 1 refused or failed; 2 bad usage or bad input.
Errors are one line on stderr that names the problem and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from stageflow.errors import StageflowError, UsageError

EPILOG_TRACKING = (
    "The tracking server comes from --tracking-uri, else MLFLOW_TRACKING_URI, "
    "else http://127.0.0.1:5000 (the one `stageflow server start` runs)."
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_guard_policies(parser: argparse.ArgumentParser) -> None:
    """The guarded model's policies, the same for `serve` and `score`."""
    parser.add_argument(
        "--unknown-category",
        choices=("reject", "flag"),
        default="reject",
        help="what the guarded model does with a category it never saw in training: reject "
        "refuses the row naming the column (REST: 400); flag accepts it (encoded as unseen) "
        "and counts it in the log (default: reject)",
    )
    parser.add_argument(
        "--abnormal-output",
        choices=("reject", "clip"),
        default="reject",
        help="what it does with a prediction outside the training target's range (regression) "
        "or invalid probabilities: reject refuses it (REST: 422); clip clips regression "
        "predictions into range and counts them (default: reject)",
    )


def _guard_config(args) -> dict:
    return {"unknown_category": args.unknown_category, "abnormal_output": args.abnormal_output}


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking server (default: MLFLOW_TRACKING_URI or http://127.0.0.1:5000)",
    )


def _add_data(parser: argparse.ArgumentParser) -> None:
    """What train and tune learn from, and the model they register."""
    parser.add_argument(
        "--data", required=True, metavar="SOURCE", help="builtin:NAME or a .csv / .parquet path"
    )
    parser.add_argument("--target", required=True, metavar="COLUMN", help="the column to predict")
    parser.add_argument(
        "--model-name", metavar="NAME", help="registered model (default: data set name)"
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _optional_positive_int(text: str) -> int | None:
    """Like a positive int, but "" means "not given" (MLproject cannot omit a flag)."""
    return _positive_int(text) if text.strip() else None


def _optional_positive_float(text: str) -> float | None:
    """Seconds > 0; "" means "not given" (MLproject cannot omit a flag)."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    from experiments import catalog  # noqa: PLC0415 - names only: `--help` stays fast

    parser = _Parser(
        prog="stageflow",
        formatter_class=_formatter,
        description=(
            "Train, register, promote, serve and roll back tabular models on MLflow.\n\n"
            "A typical day:\n"
            "  stageflow server start --detach\n"
            "  stageflow train --data builtin:wine --target target --model-name wine --family rf\n"
            "  stageflow tune --data builtin:wine --target target --model-name wine --n-trials 30 "
            "--workers 2\n"
            "  stageflow promote --model wine --version 1 --to Staging --reason 'first model'\n"
            "  stageflow promote --model wine --version 1 --to Production\n"
            "  stageflow serve --model wine --port 8080          # in another terminal\n"
            "  stageflow rollback --model wine --reason 'v2 misbehaves'\n"
            "  stageflow status --model wine; stageflow history --model wine"
        ),
        epilog=EPILOG_TRACKING,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    server = commands.add_parser(
        "server", help="start or stop the local MLflow tracking server", formatter_class=_formatter
    )
    server_commands = server.add_subparsers(dest="server_command", metavar="ACTION")
    server_commands.required = True
    start = server_commands.add_parser(
        "start",
        help="start the tracking server (reuses a healthy one)",
        description=(
            "Start `mlflow server` on 127.0.0.1 with a SQLite backend (WAL mode) and proxied "
            "artifacts under $STAGEFLOW_HOME (default ./.stageflow). A second start reuses a "
            "healthy running server."
        ),
    )
    start.add_argument("--port", type=_port, default=5000, help="port (default 5000)")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    start.add_argument("--backend-store-uri", metavar="URI", help="e.g. postgresql://user@host/db")
    start.add_argument("--artifacts-destination", metavar="URI", help="where artifacts go")
    start.add_argument(
        "--detach",
        action="store_true",
        help="return once it is healthy; stop it with `server stop`",
    )
    server_commands.add_parser("stop", help="stop the tracking server started from this folder")

    train = commands.add_parser(
        "train",
        help="train one model, log it and register a new version",
        formatter_class=_formatter,
        description=(
            "Train a scikit-learn pipeline (imputation and one-hot encoding inside) on a data "
            "source, log params, metrics, plots, data lineage and the model to MLflow, and "
            "register a new version of --model-name.\n\n"
            f"Built-in data sets: {', '.join(f'builtin:{n}' for n in sorted(catalog.BUILTINS))} "
            "(target column: target).\n\n"
            "Example:\n"
            "  stageflow train --data builtin:diabetes --target target --family hgb "
            "--param max_depth=3"
        ),
        epilog=EPILOG_TRACKING,
    )
    _add_data(train)
    train.add_argument(
        "--family",
        choices=catalog.FAMILIES,
        default="hgb",
        help="lr: logistic/linear; rf: random forest; hgb: histogram gradient boosting (default)",
    )
    train.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="estimator hyperparameter, repeatable (e.g. --param max_depth=3)",
    )
    train.add_argument("--seed", type=int, default=42, help="split and model seed (default 42)")
    train.add_argument(
        "--task",
        choices=catalog.TASKS,
        help="override the detected task (classification/regression)",
    )
    train.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: model name)"
    )
    _add_tracking(train)
    _add_json(train)

    tune = commands.add_parser(
        "tune",
        help="search hyperparameters with Optuna; register the best as a new version",
        formatter_class=_formatter,
        description=(
            "Run an Optuna study over the model families (TPE with a seed, median pruning on "
            "cross-validation folds). One parent MLflow run per call holds the study's settings, "
            "best params, plots and trials.csv; every trial is a nested run named trial-N with "
            "its params, fold metrics and state. The best trial is refit, evaluated and logged "
            "like `train` and registered as a new version of --model-name.\n\n"
            "Studies live in SQLite under $STAGEFLOW_HOME (default ./.stageflow/optuna.db); "
            "--storage postgresql://USER@HOST/DB lets workers on several machines share one. "
            "The same --study-name and --storage resume a study and add trials. Keep passwords "
            "out of URIs (use PGPASSWORD or ~/.pgpass); Stageflow masks any it is given.\n\n"
            "Examples:\n"
            "  stageflow tune --data builtin:breast_cancer --target target --model-name cancer "
            "--n-trials 40 --workers 2\n"
            "  stageflow tune --data churn.csv --target churned --n-trials 200 --workers 4 \\\n"
            "      --storage postgresql://optuna@db.internal/studies --study-name churn-v3\n"
            "  # on another machine, the same command adds its workers to churn-v3"
        ),
        epilog=EPILOG_TRACKING,
    )
    _add_data(tune)
    tune.add_argument(
        "--n-trials", required=True, type=_positive_int, metavar="N", help="trials to add"
    )
    tune.add_argument(
        "--workers", type=_positive_int, default=1, metavar="K", help="processes (default 1)"
    )
    tune.add_argument(
        "--storage", metavar="URI", help="sqlite:///PATH or postgresql://USER@HOST/DB"
    )
    tune.add_argument(
        "--study-name", metavar="NAME", help="resume this study (default: a new one per call)"
    )
    tune.add_argument(
        "--timeout",
        type=_optional_positive_float,
        metavar="SECONDS",
        help="stop starting trials after this long",
    )
    tune.add_argument(
        "--families",
        default=",".join(catalog.FAMILIES),
        metavar="LIST",
        help=f"comma-separated families to search (default {','.join(catalog.FAMILIES)})",
    )
    tune.add_argument(
        "--metric",
        metavar="NAME",
        help="optimise this (classification: accuracy, f1, roc_auc, log_loss; "
        "regression: rmse, mae, r2; default accuracy / rmse)",
    )
    tune.add_argument(
        "--folds", type=_positive_int, default=3, metavar="K", help="CV folds (default 3)"
    )
    tune.add_argument("--seed", type=int, default=42, help="split and sampler seed (default 42)")
    tune.add_argument(
        "--task",
        choices=catalog.TASKS,
        help="override the detected task (classification/regression)",
    )
    tune.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: model name)"
    )
    _add_tracking(tune)
    _add_json(tune)

    promote = commands.add_parser(
        "promote",
        help="move a version to Staging or Production through its gate",
        formatter_class=_formatter,
        description=(
            "Move a version into Staging or Production if its gate passes; the previous holder "
            "is archived and the stage's alias (challenger / champion) follows. Production is "
            "entered only from Staging. Every transition goes into the ledger.\n\n"
            "Gates (numbers from the model's policy, see `stageflow policy show`):\n"
            "  Staging:    loads and predicts its input example; test-metric thresholds;\n"
            "              input schema compatible with Production; predict latency budget\n"
            "  Production: from Staging; loads and predicts; thresholds; schema; not worse\n"
            "              than the champion on the challenger's test split (paired bootstrap)\n"
            "A refusal names the failed check and its numbers and exits 1.\n\n"
            "Example:\n"
            "  stageflow promote --model wine --version 3 --to Production --dry-run"
        ),
        epilog=EPILOG_TRACKING,
    )
    promote.add_argument("--model", required=True, metavar="NAME")
    promote.add_argument("--version", required=True, type=_positive_int, metavar="V")
    promote.add_argument("--to", required=True, metavar="STAGE", help="Staging or Production")
    promote.add_argument("--reason", default="", metavar="TEXT", help="why (kept in the ledger)")
    promote.add_argument(
        "--dry-run", action="store_true", help="run the gates and report; change nothing"
    )
    promote.add_argument(
        "--allow-breaking",
        metavar="REASON",
        help="accept an input-schema change that breaks Production's clients, saying why",
    )
    promote.add_argument(
        "--policy", metavar="FILE", help="YAML/JSON policy for this promotion (default: model's)"
    )
    _add_tracking(promote)
    _add_json(promote)

    rollback = commands.add_parser(
        "rollback",
        help="put the previous Production version back",
        description=(
            "Return Production to the version that held it before the current one (from the "
            "ledger), or to --to V. The current version is archived; the rollback is recorded."
        ),
        epilog=EPILOG_TRACKING,
    )
    rollback.add_argument("--model", required=True, metavar="NAME")
    rollback.add_argument(
        "--to", type=_optional_positive_int, metavar="V", help="a specific version"
    )
    rollback.add_argument("--reason", default="", metavar="TEXT", help="why (kept in the ledger)")
    _add_tracking(rollback)
    _add_json(rollback)

    for name, text in (
        ("status", "which version is where, and anything inconsistent"),
        ("history", "every stage transition: when, who, from → to, why"),
    ):
        sub = commands.add_parser(name, help=text, description=text, epilog=EPILOG_TRACKING)
        sub.add_argument("--model", required=True, metavar="NAME")
        if name == "status":
            sub.add_argument(
                "--repair",
                action="store_true",
                help="fix what it flags (interrupted transitions, stages and aliases), "
                "recording each fix in the ledger",
            )
        _add_tracking(sub)
        _add_json(sub)

    policy = commands.add_parser(
        "policy",
        help="show or set the promotion policy of a model",
        formatter_class=_formatter,
        description=(
            "A policy holds the numbers the gates judge by (thresholds, latency budget, "
            "champion comparison); it is stored on the registered model as the "
            "stageflow.policy tag. Unknown keys are refused. See README, 'Policies'.\n\n"
            "Examples:\n"
            "  stageflow policy show --model wine\n"
            "  stageflow policy set --model wine --file policy.yaml"
        ),
        epilog=EPILOG_TRACKING,
    )
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="ACTION")
    policy_commands.required = True
    for action, text in (("show", "the policy promotions run under"), ("set", "store one")):
        sub = policy_commands.add_parser(action, help=text, description=text)
        sub.add_argument("--model", required=True, metavar="NAME")
        if action == "set":
            sub.add_argument("--file", required=True, metavar="FILE", help="YAML or JSON")
        _add_tracking(sub)
        _add_json(sub)

    serve = commands.add_parser(
        "serve",
        help="serve the Production version over REST, following promotions and rollbacks",
        description=(
            "Serve the Production version behind a front door on 127.0.0.1:PORT. The controller "
            "polls the registry; a promotion or rollback switches what is served within seconds, "
            "without a restart. The previous Production stays warm for a rollback, and the "
            "Staging version is started ahead of its promotion, so either switch is immediate. "
            "Each version runs as several replicas; one that dies is restarted while the others "
            "serve. Every /invocations answer carries X-Model-Version. Ctrl-C stops everything "
            "it started."
        ),
        epilog=EPILOG_TRACKING,
    )
    serve.add_argument("--model", required=True, metavar="NAME")
    serve.add_argument("--port", type=_port, default=8080, help="public port (default 8080)")
    serve.add_argument(
        "--replicas",
        type=_positive_int,
        metavar="N",
        help="model server processes per live version, balanced by the front door (default: "
        "this machine's CPU cores, at most 4). Each answers on one thread, so one per core "
        "uses the machine; each also holds its own copy of the model, for the served version, "
        "its rollback standby and the warm Staging version alike, hence the cap",
    )
    _add_guard_policies(serve)
    serve.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Caddy's Prometheus metrics on 127.0.0.1:PORT/metrics (default: a free port, "
        "logged at start)",
    )
    _add_tracking(serve)

    score = commands.add_parser(
        "score",
        help="score a CSV / Parquet file with the Production version",
        description=(
            "Score a file in chunks with the Production version; the output has the input's "
            "columns plus `prediction` and `model_version`. A run in the stageflow-batch "
            "experiment records rows, seconds, version and the input's digest."
        ),
        epilog=EPILOG_TRACKING,
    )
    score.add_argument("--model", required=True, metavar="NAME")
    score.add_argument("--input", required=True, metavar="PATH", help=".csv or .parquet")
    score.add_argument("--output", required=True, metavar="PATH", help=".csv or .parquet")
    score.add_argument(
        "--chunk-rows", type=_positive_int, default=50_000, help="rows per chunk (default 50000)"
    )
    _add_guard_policies(score)
    _add_tracking(score)
    _add_json(score)

    demo = commands.add_parser(
        "demo",
        help="the whole story on a built-in data set, then clean up",
        description=(
            "Start a tracking server, train two versions, promote, serve, switch, roll back and "
            "score a batch file -- printing each step -- then stop everything it started."
        ),
    )
    demo.add_argument("--port", type=_port, default=5000, help="tracking server port")
    demo.add_argument("--serve-port", type=_port, default=8080, help="front door port")
    return parser


# --- command handlers: parse → call one library function → print -----------------------


def _emit(args, payload: dict, human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(human)


def cmd_server(args) -> int:
    from stageflow import server  # noqa: PLC0415

    if args.server_command == "stop":
        stopped = server.stop()
        print(f"stopped the tracking server at {stopped.uri}" if stopped else "no server to stop")
        return 0
    info = server.start(
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        host=args.host,
    )
    verb = "reusing the running" if info.reused else "started the"
    print(f"{verb} tracking server at {info.uri} (UI: {info.uri}, log: {info.log})")
    print(f"  export MLFLOW_TRACKING_URI={info.uri}")
    if args.detach or info.reused:
        return 0
    print("Ctrl-C stops it.")
    server.run_foreground(info)
    return 0


def _require_server_first(args) -> None:
    """Check the tracking server before the heavy imports: an unreachable one fails in
    ~3 s rather than after ~8 s of loading scikit-learn and skops."""
    from stageflow import tracking  # noqa: PLC0415

    tracking.require_server(args.tracking_uri)


def cmd_train(args) -> int:
    _require_server_first(args)
    from experiments import families  # noqa: PLC0415
    from experiments.train import train  # noqa: PLC0415

    result = train(
        args.data,
        args.target,
        model_name=args.model_name,
        family=args.family,
        params=families.parse_params(args.param),
        seed=args.seed,
        task=args.task,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
    )
    test = {k.removeprefix("test_"): v for k, v in result.metrics.items() if k.startswith("test_")}
    lines = [
        f"trained {result.family} ({result.task}) on {args.data}",
        "  test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()),
        f"registered {result.model_name} version {result.version}",
        f"  run: {result.run_url}",
        f"  next: stageflow promote --model {result.model_name} --version {result.version} "
        "--to Staging --reason '...'",
    ]
    _emit(args, result.to_json(), "\n".join(lines))
    return 0


def _transition_lines(result) -> str:
    if not result.changed:
        return (
            f"{result.model} version {result.version} is already in {result.to_stage}; "
            "nothing to do"
        )
    lines = [f"  repaired first: {line}" for line in getattr(result, "repaired", [])]
    if getattr(result, "dry_run", False):
        lines.insert(0, f"dry run: {result.model} version {result.version} would pass the gate")
    else:
        lines.insert(
            0,
            f"{result.model} version {result.version}: {result.from_stage} → {result.to_stage}"
            + (f" (archived version {', '.join(result.archived)})" if result.archived else ""),
        )
    for check in result.checks:
        lines.append(f"  {'✓' if check.passed else '✗'} {check.check}: {check.detail}")
    if getattr(result, "report_uri", ""):
        lines.append(f"  report: {result.report_uri}")
    if result.ledger_run_id:
        lines.append(f"  ledger: {result.ledger_run_id}")
    return "\n".join(lines)


def cmd_tune(args) -> int:
    from experiments.tune import tune  # noqa: PLC0415

    result = tune(
        args.data,
        args.target,
        args.n_trials,
        model_name=args.model_name or None,
        workers=args.workers,
        storage=args.storage or None,
        study_name=args.study_name or None,
        timeout=args.timeout,
        metric=args.metric or None,
        families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
        folds=args.folds,
        seed=args.seed,
        task=args.task,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        progress=not args.json,
        # Nothing has run in this process yet (no threads, databases or OpenMP), so its
        # workers can be forked instead of spawned: seconds sooner at work.
        worker_start="fork",
    )
    t = result.trials
    lines = [
        f"study {result.study_name} in {result.storage}: {t['added']} trial(s) added "
        f"({t['complete']} complete, {t['pruned']} pruned, {t['failed']} failed in all)",
        f"  best: trial {result.best_trial}, cv {result.metric} {result.best_value:.4f}, "
        + ", ".join(f"{k}={v}" for k, v in result.best_params.items()),
        "  test " + ", ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items()),
        f"registered {result.model_name} version {result.version}",
        f"  run: {result.run_url}",
        f"  more trials: stageflow tune --data {args.data} --target {args.target} "
        f"--model-name {result.model_name} --study-name {result.study_name} --n-trials N"
        + (f" --storage '{result.storage}'" if args.storage else ""),
        f"  next: stageflow promote --model {result.model_name} --version {result.version} "
        "--to Staging --reason '...'",
    ]
    _emit(args, result.to_json(), "\n".join(lines))
    return 0


def cmd_promote(args) -> int:
    from registry import Refused, promote  # noqa: PLC0415

    if args.allow_breaking is not None and not args.allow_breaking.strip():
        raise UsageError("--allow-breaking needs a reason, e.g. --allow-breaking 'clients moved'")
    try:
        result = promote(
            args.model,
            args.version,
            args.to,
            args.reason,
            args.tracking_uri,
            dry_run=args.dry_run,
            allow_breaking=args.allow_breaking or "",
            policy_file=args.policy,
        )
    except Refused as refused:
        if args.json:  # scripts get the whole report; the one-line reason still goes to stderr
            print(json.dumps(refused.result.to_json() | {"refused": True}, default=str))
        raise
    _emit(args, result.to_json(), _transition_lines(result))
    return 0


def cmd_rollback(args) -> int:
    from registry import rollback  # noqa: PLC0415

    result = rollback(args.model, args.to, args.reason, args.tracking_uri)
    _emit(args, result.to_json(), _transition_lines(result))
    return 0


def cmd_status(args) -> int:
    from registry import repair, status  # noqa: PLC0415

    if args.repair:
        fixed = repair(args.model, tracking_uri=args.tracking_uri)
        if not args.json:
            print("\n".join(f"repaired: {line}" for line in fixed) or "nothing to repair")
    st = status(args.model, args.tracking_uri)
    lines = [
        f"{st.model}",
        f"  Production: {_v(st.production)}   (@champion → {_v(st.aliases.get('champion'))})",
        f"  Staging:    {_v(st.staging)}   (@challenger → {_v(st.aliases.get('challenger'))})",
        "  versions:",
    ]
    for v in st.versions:
        lines.append(f"    {v['version']:>4}  {v['stage']:<10}  {v['description']}")
    if st.last_transition:
        t = st.last_transition
        lines.append(
            f"  last change: {t['time']} {t['actor']} moved version {t['version']} "
            f"{t['from_stage']} → {t['to_stage']}" + (f" ({t['reason']})" if t["reason"] else "")
        )
    if st.lock:
        lines.append(f"  promotion in progress: lock held by {st.lock}")
    for problem in st.problems:
        lines.append(f"  ! {problem}")
    _emit(args, st.to_json(), "\n".join(lines))
    return 0


def cmd_history(args) -> int:
    from registry import history  # noqa: PLC0415

    entries = history(args.model, args.tracking_uri)
    lines = [f"{args.model}: {len(entries)} transition(s), oldest first"]
    for e in entries:
        j = e.to_json()
        lines.append(
            f"  {j['time']}  {e.action:<8} v{e.version:<4} {e.from_stage:>10} → {e.to_stage:<10} "
            f"{e.actor}" + (f"  — {e.reason}" if e.reason else "")
        )
    _emit(args, {"model": args.model, "entries": [e.to_json() for e in entries]}, "\n".join(lines))
    return 0


def cmd_policy(args) -> int:
    import yaml  # noqa: PLC0415

    from registry import set_policy, show_policy  # noqa: PLC0415

    if args.policy_command == "set":
        policy = set_policy(args.model, args.file, args.tracking_uri)
    else:
        policy = show_policy(args.model, args.tracking_uri)
    human = f"# policy of {args.model} ({policy.source})\n" + yaml.safe_dump(
        policy.values, sort_keys=False
    )
    _emit(args, {"model": args.model, **policy.to_json()}, human.rstrip())
    return 0


def cmd_serve(args) -> int:
    from serving.controller import serve  # noqa: PLC0415

    serve(
        args.model,
        port=args.port,
        tracking_uri=args.tracking_uri,
        metrics_port=args.metrics_port,
        replicas=args.replicas,
        model_config=_guard_config(args),
    )
    return 0


def cmd_score(args) -> int:
    _require_server_first(args)
    from serving.batch import score  # noqa: PLC0415

    result = score(
        args.model,
        args.input,
        args.output,
        args.tracking_uri,
        args.chunk_rows,
        model_config=_guard_config(args),
    )
    human = (
        f"scored {result.rows} rows with {result.model} version {result.version} "
        f"in {result.seconds:.1f}s → {result.output}"
    )
    _emit(args, result.to_json(), human)
    return 0


def cmd_demo(args) -> int:
    from stageflow.demo import run_demo  # noqa: PLC0415

    return run_demo(tracking_port=args.port, serve_port=args.serve_port)


HANDLERS = {
    "server": cmd_server,
    "train": cmd_train,
    "tune": cmd_tune,
    "promote": cmd_promote,
    "rollback": cmd_rollback,
    "status": cmd_status,
    "history": cmd_history,
    "policy": cmd_policy,
    "serve": cmd_serve,
    "score": cmd_score,
    "demo": cmd_demo,
}


def _v(version) -> str:
    return f"version {version}" if version else "—"


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for ours in ("stageflow", "experiments", "registry", "serving"):
        logging.getLogger(ours).setLevel(level)
    # MLflow configures its own handler at INFO; its chatter is not the user's business.
    logging.getLogger("mlflow").setLevel(logging.DEBUG if verbose else logging.WARNING)


def quiet_mlflow() -> None:
    """MLflow prints run URLs to stdout and progress bars to stderr; --json needs clean stdout."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_PRINT_MODEL_URLS_ON_CREATION", "false")
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(mlflow|sklearn|matplotlib)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, quiet=getattr(args, "json", False))
    quiet_mlflow()
    started = time.perf_counter()
    try:
        code = HANDLERS[args.command](args)
    except StageflowError as exc:
        print(f"stageflow {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"stageflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, and the full trace only with -v
        if args.verbose:
            raise
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        print(
            f"stageflow {args.command}: failed: {type(exc).__name__}: {first} "
            "(re-run with -v for details)",
            file=sys.stderr,
        )
        return 1
    logging.getLogger(__name__).debug("%s took %.1fs", args.command, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
