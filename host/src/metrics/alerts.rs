//! The alert rules of `nats/alerts.yml` against the real `promtool` and
//! against what the host exports: a rule that names a metric the host
//! does not have, or a test series shaped unlike the real one, would pass
//! promtool and never fire in production.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Backlog, Metrics};

fn nats_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether a missing test tool fails the test instead of skipping it: in
/// CI, and wherever `scripts/test.sh` runs (it sets `REQUIRE_TEST_TOOLS`).
fn tools_required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("REQUIRE_TEST_TOOLS").is_some()
}

#[test]
fn promtool_checks_the_rules_and_drives_every_alert_to_fire_and_to_stay_quiet() {
    let Ok(version) = Command::new("promtool").arg("--version").output() else {
        assert!(
            !tools_required(),
            "promtool is not installed (Debian package `prometheus`; scripts/prereqs.sh installs it)"
        );
        eprintln!(
            "SKIPPED: promtool is not installed, so nats/alerts.yml is not tested \
             (apt-get install prometheus, or run scripts/test.sh)"
        );
        return;
    };
    assert!(version.status.success(), "promtool --version failed");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(nats_dir())
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert of the rule file has a test.
    let tests = read(&nats_dir().join("alerts.test.yml"));
    for alert in alert_names() {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no test in alerts.test.yml"
        );
    }
}

fn alert_names() -> Vec<String> {
    read(&nats_dir().join("alerts.yml"))
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect()
}

/// Every metric family with one sample, as a running host exports them.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let metrics = Metrics::default();
    metrics.accepted("crm");
    metrics.duplicate("crm");
    metrics.rejected("crm", "unavailable");
    metrics.publish_took(Duration::from_millis(1));
    let _in_flight = metrics.in_flight();
    metrics.invoked("rec", "ok", Duration::from_millis(1));
    metrics.dead_lettered("rec", "permanent");
    metrics.partitions_owned("rec", 8);
    metrics.partitions("rec", Some(16));
    metrics.dlq_gauges("rec", 1, Duration::from_secs(5));
    metrics.handler_version("rec", Some("1-abc"), None);
    metrics.backlog_gauges("rec", &Backlog::default());
    metrics.activation_failed("rec");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in metrics.render().lines().filter(|l| !l.starts_with('#')) {
        let (name, labels) = series(line.split(' ').next().unwrap_or_default());
        out.entry(name).or_default().extend(labels);
    }
    out
}

/// A series' name and label names: `a_total{x="1",y="2"}` → (`a_total`, {x, y}).
fn series(text: &str) -> (String, BTreeSet<String>) {
    match text.split_once('{') {
        Some((name, rest)) => (
            name.to_string(),
            rest.trim_end_matches('}')
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, _)| k.trim().to_string())
                .collect(),
        ),
        None => (text.to_string(), BTreeSet::new()),
    }
}

#[test]
fn the_rules_and_their_tests_use_the_metrics_and_labels_the_host_exports() {
    let exported = exported();
    let rules: String = read(&nats_dir().join("alerts.yml"))
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("hookmesh_") {
            named += 1;
            assert!(
                exported.contains_key(word),
                "alerts.yml names {word}, which the host does not export; it exports {:?}",
                exported.keys()
            );
        }
    }
    assert!(named >= 7, "the rules name hookmesh metrics");

    // The test file's series look like the real ones (plus the scrape's
    // `instance`).
    let tests = read(&nats_dir().join("alerts.test.yml"));
    let mut checked = 0;
    for line in tests.lines() {
        let Some(text) = line.trim().strip_prefix("- series: ") else {
            continue;
        };
        let (name, mut labels) = series(text.trim_matches('\''));
        labels.remove("instance");
        let real = exported.get(&name).unwrap_or_else(|| {
            panic!("alerts.test.yml feeds {name}, which the host does not export")
        });
        assert_eq!(&labels, real, "labels of {name} in alerts.test.yml");
        checked += 1;
    }
    assert!(checked > 0);
}

/// The anchor GitHub gives a heading: lower case, spaces to `-`, other
/// punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_a_summary_and_a_runbook_section_in_operations_md() {
    let rules = read(&nats_dir().join("alerts.yml"));
    let runbook = read(&nats_dir().join("../docs/operations.md"));
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect();
    let alerts = alert_names();
    let summaries = rules.matches("summary: ").count();
    assert_eq!(summaries, alerts.len(), "one summary per alert");
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .map(|l| l.trim_matches('"'))
        .collect();
    assert_eq!(links.len(), alerts.len(), "one runbook link per alert");
    for (alert, link) in alerts.iter().zip(&links) {
        let anchor = link
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("{alert}: {link} is not a section of docs/operations.md"));
        assert_eq!(anchor, format!("alert-{}", alert.to_lowercase()), "{alert}");
        assert!(
            anchors.contains(anchor),
            "{alert}: docs/operations.md has no section #{anchor}"
        );
    }
}
