"""docs/operations.md's Prometheus blocks are real: the alert rules pass ``promtool check
rules`` and ask only for metric names the daemon exposes, the scrape job is valid YAML."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import need
from helpers import ROOT, make_settings
from mailrouter.metrics import PrometheusMetrics
from mailrouter.runtime import Runtime

OPERATIONS = ROOT / "docs" / "operations.md"


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", OPERATIONS.read_text("utf-8"), re.S)


def rules_block() -> str:
    [rules] = [b for b in yaml_blocks() if b.startswith("# /etc/prometheus/rules/")]
    return rules


def test_alert_rules_use_only_exposed_metric_names(tmp_path: Path) -> None:
    metrics = PrometheusMetrics()
    rt = Runtime.open(make_settings(tmp_path), metrics=metrics)
    try:
        body = metrics.render()[0].decode()
    finally:
        rt.close()
    exposed = {
        family.name + suffix
        for family in text_string_to_metric_families(body)
        for suffix in ("", "_total", "_bucket", "_sum", "_count")
    }
    used = set(re.findall(r"mailrouter_\w+", rules_block()))
    assert {"mailrouter_queue_oldest_age_seconds", "mailrouter_queue_messages"} <= used
    assert used <= exposed, sorted(used - exposed)


def test_alert_rules_and_scrape_job_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool (Debian package prometheus) is not installed")
    assert promtool is not None
    rules = tmp_path / "mailrouter.rules.yml"
    rules.write_text(rules_block(), "utf-8")
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 10 rules found" in checked.stdout
    [scrape] = [b for b in yaml_blocks() if b.startswith("# prometheus.yml")]
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape + f"rule_files: [{rules}]\n", "utf-8")
    checked = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
