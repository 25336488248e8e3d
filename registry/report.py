"""The gate report: every check of one decision, its figures, pass/fail, and the policy.

Written as JSON (for scripts) and Markdown (for people) into the decision's ledger
run; a one-line summary goes into the version's description and tags.
"""

from __future__ import annotations

import json
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.gates import CheckResult
from registry.policy import Policy

PASSED, REFUSED = "passed", "refused"
GATE_TAG = "stageflow.gate."  # + stage: "passed"/"refused"; + stage + ".report": the artifact
DESCRIPTION_PREFIX = "Gate to "


def build(
    model: str,
    version: str,
    from_stage: str,
    to_stage: str,
    action: str,
    actor: str,
    reason: str,
    policy: Policy,
    checks: list[CheckResult],
    allow_breaking: str = "",
    dry_run: bool = False,
) -> dict:
    failed = [c.check for c in checks if not c.passed]
    return {
        "model": model,
        "version": version,
        "from_stage": from_stage,
        "to_stage": to_stage,
        "action": action,
        "decision": REFUSED if failed else PASSED,
        "failed_checks": failed,
        "actor": actor,
        "reason": reason,
        "allow_breaking": allow_breaking,
        "dry_run": dry_run,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "policy": policy.to_json(),
        "checks": [c.to_json() for c in checks],
    }


def markdown(report: dict) -> str:
    """The report as a page a reviewer reads in the MLflow UI."""
    lines = [
        f"# {report['action'].title()} {report['model']} v{report['version']}: "
        f"{report['from_stage']} → {report['to_stage']} — **{report['decision'].upper()}**",
        "",
        f"- when: {report['time']}; who: {report['actor']}",
        f"- reason: {report['reason'] or '—'}",
        f"- policy: {report['policy']['source']}",
    ]
    if report["allow_breaking"]:
        lines.append(f"- breaking schema change allowed because: {report['allow_breaking']}")
    if report["dry_run"]:
        lines.append("- dry run: nothing was changed")
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    for check in report["checks"]:
        mark = "pass" if check["passed"] else "**FAIL**"
        lines.append(f"| {check['check']} | {mark} | {check['detail'].replace('|', '/')} |")
    lines += ["", "## Figures", ""]
    for check in report["checks"]:
        if check["figures"]:
            lines += [f"### {check['check']}", "", "```json"]
            lines += [json.dumps(check["figures"], indent=2, default=str), "```", ""]
    lines += ["## Policy", "", "```json", json.dumps(report["policy"], indent=2), "```", ""]
    return "\n".join(lines)


def summary(report: dict) -> str:
    """One line: the decision, which checks failed, the policy, where the full report is."""
    failed = report["failed_checks"]
    why = f" ({', '.join(failed)} failed)" if failed else ""
    return (
        f"{DESCRIPTION_PREFIX}{report['to_stage']}: {report['decision']}{why}; "
        f"policy: {report['policy']['source']}"
    )


def annotate_version(client: MlflowClient, report: dict, report_uri: str) -> None:
    """Tag the version with the decision and put the summary line in its description.

    The description keeps its training summary; the line for this stage is replaced.
    """
    model, version, stage = report["model"], report["version"], report["to_stage"]
    key = f"{GATE_TAG}{stage.lower()}"
    try:
        client.set_model_version_tag(model, version, key, report["decision"])
        client.set_model_version_tag(model, version, f"{key}.report", report_uri)
        client.set_model_version_tag(model, version, f"{key}.policy", report["policy"]["source"])
        current = client.get_model_version(model, version).description or ""
        kept = [
            line
            for line in current.splitlines()
            if not line.startswith(f"{DESCRIPTION_PREFIX}{stage}:")
        ]
        line = f"{summary(report)}; report: {report_uri}"
        client.update_model_version(model, version, description="\n".join([*kept, line]))
    except MlflowException:
        # The ledger run holds the report; a description that lags behind is cosmetic.
        pass
