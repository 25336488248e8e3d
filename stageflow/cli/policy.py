"""``stageflow policy show|set``: the numbers a model's gates judge by."""

from __future__ import annotations

from stageflow.cli._common import EPILOG_TRACKING, add_json, add_tracking, emit, formatter


def add_commands(commands) -> None:
    policy = commands.add_parser(
        "policy",
        help="show or set the promotion policy of a model",
        formatter_class=formatter,
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
    policy.set_defaults(handler=run)
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="ACTION")
    policy_commands.required = True
    for action, text in (("show", "the policy promotions run under"), ("set", "store one")):
        sub = policy_commands.add_parser(action, help=text, description=text)
        sub.add_argument("--model", required=True, metavar="NAME")
        if action == "set":
            sub.add_argument("--file", required=True, metavar="FILE", help="YAML or JSON")
        add_tracking(sub)
        add_json(sub)


def run(args) -> int:
    import yaml  # noqa: PLC0415

    from registry import set_policy, show_policy  # noqa: PLC0415

    if args.policy_command == "set":
        policy = set_policy(args.model, args.file, args.tracking_uri)
    else:
        policy = show_policy(args.model, args.tracking_uri)
    human = f"# policy of {args.model} ({policy.source})\n" + yaml.safe_dump(
        policy.values, sort_keys=False
    )
    emit(args, {"model": args.model, **policy.to_json()}, human.rstrip())
    return 0
