"""The shipped alert rules (deploy/alerts.yml): valid for promtool, loaded by the compose Prometheus, built on
metrics the server really exports, and each alert fires on the series it is for and stays silent otherwise.

The behaviour is tested with ``promtool test rules`` (Debian's ``prometheus`` package, which CI installs): each
alert gets synthetic series of a failing and of a healthy target, and the test asserts which alerts fire at
which time, with their labels and rendered annotations. promtool compares annotations whole, so the expected
ones are rendered here from the rule file's own templates (``$labels`` and ``$value`` only).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import REPO_ROOT, render, require, require_module

from serving.metrics import LATENCY_BUCKETS, Metrics

ALERTS = REPO_ROOT / "deploy" / "alerts.yml"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus.yml"
JOB = "coursezoo"
A, B = "10.0.0.2:8002", "10.0.0.3:8002"  # two replicas, as Docker's DNS names them


@pytest.fixture(scope="module")
def promtool() -> str:
    return require(shutil.which("promtool"), "promtool")


@pytest.fixture(scope="module")
def yaml() -> Any:
    return require_module("yaml")


@pytest.fixture(scope="module")
def rules(yaml: Any) -> dict[str, dict[str, Any]]:
    """The alerting rules by name."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_loads_the_rules(yaml: Any, promtool: str) -> None:
    """prometheus.yml names the rule file, and compose mounts it where that name resolves in the container
    (rule files are relative to the config file's folder)."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]
    # Without --syntax-only promtool also reads the rule files the config names.
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr

    service = render("gpu", profiles=("monitoring",))["services"]["prometheus"]
    mounts = {m["target"]: m for m in service["volumes"] if m["type"] == "bind"}
    config_file = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file="))
    for name, source in ((Path(config_file).name, PROMETHEUS), ("alerts.yml", ALERTS)):
        mount = mounts[str(Path(config_file).parent / name)]
        assert Path(mount["source"]) == source and mount["read_only"], mount


def test_every_alert_is_labelled_and_explained(rules: dict[str, dict[str, Any]]) -> None:
    assert len(rules) >= 8
    for name, rule in rules.items():
        assert name.startswith("CourseZoo"), name
        assert rule.get("for"), f"{name}: no `for`, one bad scrape would fire it"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert set(rule["annotations"]) >= {"summary", "description"}, name
        # every metric the rule reads is taken from the CourseZoo scrape job only
        for selector in re.findall(r"\b(?:coursezoo_|process_|up\b)[^\s(){]*(\{[^}]*\})?", rule["expr"]):
            assert f'job="{JOB}"' in selector, f"{name}: a selector without job=\"{JOB}\": {rule['expr']}"


def test_rules_use_only_exported_metrics(rules: dict[str, dict[str, Any]]) -> None:
    """Every series a rule reads is one the server exports: the series names of its registry's metric families
    (prometheus-client adds ``_total`` to a counter, ``_bucket``/``_sum``/``_count`` to a histogram)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = set()
    for family in Metrics().registry.collect():
        exported |= {family.name + suffix for suffix in suffixes.get(family.type, [])}
        exported |= {sample.name for sample in family.samples}  # the process collector's, already there
    assert {"process_open_fds", "process_max_fds"} <= exported, "the process collector is not registered"
    for name, rule in rules.items():
        used = set(re.findall(r"\b(?:coursezoo|process)_[a-z_]+", rule["expr"]))
        assert used <= exported, f"{name} reads series the server does not export: {sorted(used - exported)}"


# --- behaviour, through promtool test rules --------------------------------------------------------------

Labels = dict[str, str]


@dataclass
class Scenario:
    """Input series (promtool's expanding notation, one sample a minute) and, per evaluation time, the alerts
    expected firing: (labels of the alert besides alertname and severity, the `$value` as the annotations
    render it, or None where they do not use it). An empty list asserts that the alert is silent then."""

    series: list[tuple[str, str]]
    checks: list[tuple[str, list[tuple[Labels, str | None]]]]


def sel(metric: str, **labels: str) -> str:
    labels = {"job": JOB, **labels}
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def latency(model: str, rpc: str, instance: str, slowest: float, per_minute: int = 60) -> list[tuple[str, str]]:
    """Histogram buckets of requests that all took between the bucket below ``slowest`` and ``slowest``."""
    out = []
    for le in [*LATENCY_BUCKETS, "+Inf"]:
        values = f"0+{per_minute}x30" if le == "+Inf" or le >= slowest else "0x30"
        out.append((sel("coursezoo_request_latency_seconds_bucket", instance=instance, model=model, version="1",
                        rpc=rpc, le=str(le)), values))
    return out


def failures(model: str, code: str, values: str, instance: str = A, rpc: str = "ClassifyDigits",
             version: str = "1") -> tuple[str, str]:
    return sel("coursezoo_request_failures_total", instance=instance, model=model, version=version, rpc=rpc,
               code=code), values


def requests(model: str, values: str, instance: str = A, rpc: str = "ClassifyDigits",
             version: str = "1") -> tuple[str, str]:
    return sel("coursezoo_requests_total", instance=instance, model=model, version=version, rpc=rpc), values


def queued(model: str, version: str, values: str, instance: str = A) -> tuple[str, str]:
    return sel("coursezoo_queue_depth", instance=instance, model=model, version=version), values


def ready(model: str, version: str, values: str, instance: str = A) -> tuple[str, str]:
    return sel("coursezoo_model_ready", instance=instance, model=model, version=version), values


SCENARIOS: dict[str, list[Scenario]] = {
    "CourseZooTargetDown": [Scenario(
        series=[(sel("up", instance=A), "1 1 0x10"), (sel("up", instance=B), "1x12"),
                ('up{job="node",instance="10.0.0.9:9100"}', "0x12")],  # another job's target is not ours
        checks=[("3m", []),  # down for 1 minute only: pending
                ("5m", [({"job": JOB, "instance": A}, None)])],
    )],
    "CourseZooNoTargets": [
        Scenario(series=[('up{job="node",instance="10.0.0.9:9100"}', "1x12")],
                 checks=[("3m", []), ("6m", [({"job": JOB}, None)])]),
        Scenario(series=[(sel("up", instance=A), "0x12")], checks=[("6m", [])]),
    ],
    "CourseZooModelVersionNotReady": [Scenario(
        series=[ready("mnist_cnn", "1", "1x12"), ready("mnist_cnn", "2", "1 1 0x10"),
                ready("names_gru", "1", "0 0 1x10")],  # loaded a little late: never alerts
        checks=[("3m", []), ("8m", [({"job": JOB, "instance": A, "model": "mnist_cnn", "version": "2"}, None)])],
    )],
    "CourseZooModelNotServing": [Scenario(
        series=[ready("mnist_cnn", "1", "1x12"), ready("mnist_cnn", "2", "0x12"),  # version 1 still serves
                ready("names_gru", "1", "1 1 0x10"), ready("names_gru", "2", "0x12")],
        checks=[("3m", []), ("8m", [({"job": JOB, "instance": A, "model": "names_gru"}, None)])],
    )],
    "CourseZooInternalErrors": [Scenario(
        series=[(sel("up", instance=A), "1x20"),
                failures("mnist_cnn", "INTERNAL", "0+60x10 600x10", version="2"),  # 1/s for 10 minutes, then none
                failures("mnist_cnn", "INTERNAL", "5x20"),  # the version before: an old failure, no new ones
                failures("names_gru", "INTERNAL", "3x20"),  # an old failure, no new ones
                failures("", "NOT_FOUND", "0+60x20", version=""),  # the client's mistake, not the server's
                failures("mnist_cnn", "UNAVAILABLE", "0+60x20")],
        # the version that fails is named: a new one beside the old (a canary) shows apart from it
        checks=[("1m", []), ("10m", [({"job": JOB, "instance": A, "model": "mnist_cnn", "version": "2"}, "1")]),
                ("20m", [])],
    ), Scenario(
        # The first failure of a (model, rpc) creates its series, which rate() cannot see: it alerted only from
        # the second failure on. A series new within 5 minutes counts too (its value per 5 minutes, as a rate),
        # on a target scraped 5 minutes before: not every old series in the first minutes of a Prometheus.
        series=[(sel("up", instance=A), "1x20"), (sel("up", instance=B), "_x3 1x17"),
                failures("hello_rnn", "INTERNAL", "_x5 1x15"),  # one failure at 5m, none after
                failures("names_gru", "INTERNAL", "2x20"),  # an old series: nothing new
                failures("mnist_cnn", "INTERNAL", "_x3 4x17", instance=B)],  # old, on a target first seen at 3m
        checks=[("2m", []), ("5m", []),
                ("7m", [({"job": JOB, "instance": A, "model": "hello_rnn", "version": "1"}, "3.333m")]), ("12m", [])],
    )],
    "CourseZooUnavailableRatioHigh": [Scenario(
        series=[requests("mnist_cnn", "0+600x30"), failures("mnist_cnn", "UNAVAILABLE", "0+60x30"),  # 10%
                requests("names_gru", "0+600x30"), failures("names_gru", "UNAVAILABLE", "0+6x30"),  # 1%
                requests("idle", "5x30"), failures("idle", "UNAVAILABLE", "5x30")],  # no traffic at all
        checks=[("5m", []), ("15m", [({"job": JOB, "instance": A, "model": "mnist_cnn"}, "10%")])],
    )],
    "CourseZooLatencyP99High": [Scenario(
        series=[*latency("mnist_cnn", "ClassifyDigits", A, slowest=1.0),  # p99 0.995 s
                *latency("mnist_cnn", "ClassifyDigits", B, slowest=0.01),  # the other replica is fast
                *latency("names_gru", "ClassifySequences", A, slowest=0.5)],  # p99 0.4975 s: just under
        checks=[("5m", []), ("15m", [({"job": JOB, "instance": A, "model": "mnist_cnn", "rpc": "ClassifyDigits"},
                                      "995ms")])],
    )],
    "CourseZooQueueDepthHigh": [Scenario(
        series=[queued("mnist_cnn", "1", "0 2000x20"),
                queued("names_gru", "1", "900x20"),
                queued("mnist_inception", "1", "600x20"), queued("mnist_inception", "2", "600x20"),  # 1200 in all
                queued("mnist_cnn", "1", "0 4000 0x19", instance=B)],  # a burst
        checks=[("3m", []), ("10m", [({"job": JOB, "instance": A, "model": "mnist_cnn"}, "2k"),
                                     ({"job": JOB, "instance": A, "model": "mnist_inception"}, "1.2k")])],
    )],
    "CourseZooFileDescriptorsNearLimit": [Scenario(
        series=[(sel("process_open_fds", instance=A), "900x20"), (sel("process_max_fds", instance=A), "1000x20"),
                # 79%: just under the limit
                (sel("process_open_fds", instance=B), "790x20"), (sel("process_max_fds", instance=B), "1000x20")],
        checks=[("4m", []), ("10m", [({"job": JOB, "instance": A}, "90%")])],
    )],
}


def rendered(rule: dict[str, Any], labels: Labels, value: str | None) -> dict[str, str]:
    """The rule's annotations as Prometheus renders them for an alert with these labels and value."""
    out = {}
    for key, template in rule["annotations"].items():
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
        if value is not None:
            text = re.sub(r"\{\{ \$value(?: \| \w+)? \}\}", value, text)
        assert "{{" not in text, f"{rule['alert']}: a template this test cannot render: {text}"
        out[key] = text
    return out


def test_every_alert_has_scenarios(rules: dict[str, dict[str, Any]]) -> None:
    assert set(SCENARIOS) == set(rules)


@pytest.mark.parametrize("alert", sorted(SCENARIOS))
def test_alert_fires_when_it_should(alert: str, rules: dict[str, dict[str, Any]], promtool: str, yaml: Any,
                                    tmp_path: Path) -> None:
    rule = rules[alert]
    interval = yaml.safe_load(PROMETHEUS.read_text())["global"]["evaluation_interval"]
    tests = []
    for scenario in SCENARIOS[alert]:
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in scenario.series],
            "alert_rule_test": [
                {"eval_time": at, "alertname": alert,
                 "exp_alerts": [{"exp_labels": {**labels, "severity": rule["labels"]["severity"]},
                                 "exp_annotations": rendered(rule, labels, value)} for labels, value in firing]}
                for at, firing in scenario.checks],
        })
    assert any(firing for s in SCENARIOS[alert] for _, firing in s.checks), "never asserts that it fires"
    assert any(not firing for s in SCENARIOS[alert] for _, firing in s.checks), "never asserts that it is silent"
    unit = tmp_path / "alerts_test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": interval,
                                    "tests": tests}, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
