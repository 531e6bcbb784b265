//! `[[outbox]]`: the example entry, defaults, environment overrides that
//! reach or create an entry, secret URLs and their redaction. (Bad values:
//! the golden files `tests/config/invalid/outbox_*`.)

use std::path::PathBuf;
use std::time::Duration;

use super::super::{Config, ConfigError, DEV_CONFIG, Env, Origin};

const EXAMPLE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../hookmesh.example.toml"
));

fn load(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(
        text,
        Origin::File(PathBuf::from("hookmesh.toml")),
        &Env::from_pairs(pairs.iter().copied()),
    )
}

fn load_ok(text: &str, pairs: &[(&str, &str)]) -> Config {
    load(text, pairs).unwrap_or_else(|e| panic!("config should load, got: {e}"))
}

#[test]
fn the_example_entry_loads_with_every_key_it_documents() {
    let config = load_ok(
        EXAMPLE,
        &[
            ("STRIPE_SECRET", "whsec_stripe-example-secret"),
            ("GITHUB_SECRET", "github-example-secret"),
            ("SHOP_SECRET", "shop-example-secret"),
        ],
    );
    let [erp] = config.outbox.as_slice() else {
        panic!("one entry: {:?}", config.outbox);
    };
    assert_eq!(erp.source, "erp");
    assert_eq!(erp.database.describe(), "hookmesh@127.0.0.1:5432/erp");
    assert_eq!(erp.table.to_string(), "outbox_events");
    assert_eq!(erp.batch, 500);
    assert_eq!(erp.poll_interval, Duration::from_secs(1));
    assert_eq!(erp.max_attempts, 20);
    assert_eq!(erp.backoff.initial, Duration::from_secs(1));
    assert_eq!(erp.backoff.max, Duration::from_secs(300));
}

#[test]
fn no_entry_means_no_relay_and_a_minimal_entry_takes_the_defaults() {
    assert!(load_ok(DEV_CONFIG, &[]).outbox.is_empty());
    let config = load_ok(
        "[[outbox]]\nsource = \"wms\"\ndatabase_url = \"postgres://127.0.0.1/wms\"\ntable = \"logistics.outbox\"\n",
        &[],
    );
    let wms = &config.outbox[0];
    assert_eq!(wms.table.sql(), "\"logistics\".\"outbox\"");
    assert_eq!(
        (wms.batch, wms.max_attempts, wms.poll_interval),
        (
            super::DEFAULT_BATCH,
            super::DEFAULT_MAX_ATTEMPTS,
            super::DEFAULT_POLL_INTERVAL
        )
    );
}

#[test]
fn one_environment_variable_creates_a_whole_relay() {
    let config = load_ok(
        DEV_CONFIG,
        &[
            ("HOOKMESH_OUTBOX_ERP_DATABASE_URL", "env:ERP_DATABASE_URL"),
            (
                "ERP_DATABASE_URL",
                "postgres://erp:pw-4711@127.0.0.1:5432/erp",
            ),
        ],
    );
    let [erp] = config.outbox.as_slice() else {
        panic!("one entry: {:?}", config.outbox);
    };
    assert_eq!(erp.source, "erp");
    assert_eq!(erp.database.describe(), "erp@127.0.0.1:5432/erp");
    assert_eq!(erp.table.to_string(), "outbox_events");
}

#[test]
fn overrides_reach_the_entry_of_their_source_dash_and_nested_keys_included() {
    let file = r#"
[[outbox]]
source = "erp"
database_url = "postgres://127.0.0.1/erp"

[[outbox]]
source = "erp-eu"
database_url = "postgres://127.0.0.1/erp_eu"
batch = 100
"#;
    let config = load_ok(
        file,
        &[
            ("HOOKMESH_OUTBOX_ERP_EU_BATCH", "50"),
            ("HOOKMESH_OUTBOX_ERP_EU_POLL_INTERVAL", "250ms"),
            ("HOOKMESH_OUTBOX_ERP_EU_BACKOFF_MAX", "1m"),
            ("HOOKMESH_OUTBOX_ERP_MAX_ATTEMPTS", "3"),
        ],
    );
    let sources: Vec<&str> = config.outbox.iter().map(|o| o.source.as_str()).collect();
    assert_eq!(sources, ["erp", "erp-eu"], "no entry was added");
    let (erp, eu) = (&config.outbox[0], &config.outbox[1]);
    assert_eq!(erp.max_attempts, 3);
    assert_eq!(erp.batch, super::DEFAULT_BATCH);
    assert_eq!(eu.batch, 50);
    assert_eq!(eu.poll_interval, Duration::from_millis(250));
    assert_eq!(eu.backoff.max, Duration::from_secs(60));
    assert_eq!(eu.backoff.initial, Duration::from_secs(1));
}

#[test]
fn a_bad_override_names_the_variable_and_the_key() {
    let file = "[[outbox]]\nsource = \"erp\"\ndatabase_url = \"postgres://127.0.0.1/erp\"\n";
    let error = load(file, &[("HOOKMESH_OUTBOX_ERP_BATCH", "lots")]).expect_err("not a number");
    assert_eq!(
        error.to_string(),
        "HOOKMESH_OUTBOX_ERP_BATCH: outbox[0].batch: expected a whole number, 0 or more, found \"lots\""
    );
    let error = load(file, &[("HOOKMESH_OUTBOX_ERP_COLOUR", "blue")]).expect_err("no such key");
    assert!(
        error
            .to_string()
            .starts_with("HOOKMESH_OUTBOX_ERP_COLOUR: expected HOOKMESH_OUTBOX_<SOURCE>_<KEY>"),
        "{error}"
    );
}

#[test]
fn a_database_url_from_a_file_never_shows_its_password() {
    let path = std::env::temp_dir().join(format!(
        "hookmesh-outbox-url-{}-{}",
        std::process::id(),
        line!()
    ));
    std::fs::write(&path, "postgres://erp:file-pw-4711@db.internal/erp\n").expect("write");
    let file = format!(
        "[[outbox]]\nsource = \"erp\"\ndatabase_url = \"file:{}\"\n",
        path.display()
    );
    let loaded = load(&file, &[]);
    let _ = std::fs::remove_file(&path);
    let config = loaded.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.outbox[0].database.describe(),
        "erp@db.internal:5432/erp"
    );
    for output in [format!("{config:?}"), format!("{config:#?}")] {
        assert!(!output.contains("file-pw-4711"), "{output}");
    }
}
