//! Tests of configuration loading: the shipped example and development
//! files, environment overrides, golden error messages for bad files
//! (`tests/config/invalid/<case>.toml` beside `<case>.err`), secret
//! resolution and redaction.

use std::time::{SystemTime, UNIX_EPOCH};

use ::http::{HeaderMap, HeaderName};

use super::*;
use crate::verify::sign;

const EXAMPLE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../hookmesh.example.toml");
const EXAMPLE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../hookmesh.example.toml"
));
const GOLDEN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/config/invalid");

/// The origin every test file is loaded as, so messages are machine-independent.
const FILE: &str = "hookmesh.toml";

/// The public Standard Webhooks test secret used by the example and dev files.
const CRM_LITERAL: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A second valid Standard Webhooks secret (base64 of `crm-rotated-key-bytes`).
const CRM_ROTATED: &str = "whsec_Y3JtLXJvdGF0ZWQta2V5LWJ5dGVz";

fn vars(pairs: &[(&str, &str)]) -> Env {
    Env::from_pairs(pairs.iter().copied())
}

fn load(text: &str, env: &Env) -> Result<Config, ConfigError> {
    Config::from_toml(text, Origin::File(PathBuf::from(FILE)), env)
}

fn load_ok(text: &str, env: &Env) -> Config {
    load(text, env).unwrap_or_else(|e| panic!("config should load, got: {e}"))
}

fn load_err(text: &str, env: &Env) -> ConfigError {
    match load(text, env) {
        Ok(config) => panic!("config should fail, loaded: {config:?}"),
        Err(e) => e,
    }
}

/// The secrets the example needs, except `CRM_SECRET`.
fn example_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("STRIPE_SECRET", "whsec_stripe-example-secret"),
        ("GITHUB_SECRET", "github-example-secret"),
        ("SHOP_SECRET", "shop-example-secret"),
    ]
}

fn header(name: &'static str) -> Source {
    Source::Header(HeaderName::from_static(name))
}

fn json(pointer: &str) -> Source {
    Source::Json(pointer.to_string())
}

fn provider<'c>(config: &'c Config, name: &str) -> &'c Provider {
    config
        .providers
        .get(name)
        .unwrap_or_else(|| panic!("no provider {name:?} in {:?}", config.providers.keys()))
}

fn names(config: &Config) -> Vec<&str> {
    config.providers.keys().map(String::as_str).collect()
}

/// Which of the verifier's secrets accepts a webhook signed with `raw` (the
/// secret as written in a config), if any. This checks what a secret resolved
/// to without looking inside `SecretKey`.
fn accepting_key(verifier: &Verifier, raw: &str) -> Option<usize> {
    let key = SecretKey::parse(&verifier.scheme, raw).expect("test secret parses");
    let now = SystemTime::now();
    let body = br#"{"id":"evt_1","type":"order.created"}"#;
    let mut headers = HeaderMap::new();
    for (name, value) in sign(&verifier.scheme, &key, "msg_1", body, now) {
        headers.insert(name, value);
    }
    verifier
        .verify(&headers, body, now)
        .ok()
        .map(|v| v.key_index)
}

/// A file in the temporary directory, removed when dropped (also on panic).
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, contents: &str) -> TempFile {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "hookmesh-config-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    fn reference(&self) -> String {
        format!("file:{}", self.0.display())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------
// The example file

#[test]
fn example_loads_and_skips_the_unset_crm_rotation_secret() {
    let config = load_ok(EXAMPLE, &vars(&example_env()));

    assert_eq!(names(&config), ["crm", "github", "shop", "stripe"]);
    assert_eq!(
        config.warnings,
        [
            "providers.crm.secrets[0]: environment variable CRM_SECRET is not set; \
          using the provider's other secrets"
        ]
    );

    assert_eq!(config.nats.urls, ["nats://127.0.0.1:4222"]);
    assert_eq!(config.nats.auth, NatsAuth::None);
    assert!(!config.nats.tls_required);
    assert_eq!(config.nats.replicas, 1);

    assert_eq!(
        config.http.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.http.max_body_bytes, 1_040_384);

    let ingest = &config.ingest;
    assert_eq!(ingest.duplicate_window, Duration::from_secs(2 * 60));
    assert_eq!(ingest.idempotency_ttl, Duration::from_secs(7 * 86_400));
    assert_eq!(ingest.publish_timeout, Duration::from_secs(5));
    assert_eq!(ingest.partitions, 16);
    // Not in the file: the defaults.
    assert_eq!(ingest.retry_after, Duration::from_secs(5));
    assert_eq!(ingest.max_age, Duration::from_secs(7 * 86_400));

    let crm = provider(&config, "crm");
    assert_eq!(crm.name, "crm");
    assert_eq!(crm.verifier.scheme, Scheme::StandardWebhooks);
    assert_eq!(crm.verifier.secrets.len(), 1);
    assert_eq!(crm.verifier.tolerance, Duration::from_secs(300));
    assert_eq!(accepting_key(&crm.verifier, CRM_LITERAL), Some(0));
    assert_eq!(
        crm.fields,
        FieldSources {
            event_id: Some(header("webhook-id")),
            event_type: json("/type"),
            domain: None,
            entity_id: json("/data/id"),
            entity_version: Some(json("/data/version")),
        }
    );

    let stripe = provider(&config, "stripe");
    assert_eq!(stripe.verifier.scheme, Scheme::Stripe);
    assert_eq!(stripe.verifier.secrets.len(), 1);
    assert_eq!(
        accepting_key(&stripe.verifier, "whsec_stripe-example-secret"),
        Some(0)
    );
    assert_eq!(
        stripe.fields,
        FieldSources {
            event_id: Some(json("/id")),
            event_type: json("/type"),
            domain: Some(json("/data/object/object")),
            entity_id: json("/data/object/id"),
            entity_version: None,
        }
    );

    let github = provider(&config, "github");
    assert_eq!(github.verifier.scheme, Scheme::Github);
    assert_eq!(
        accepting_key(&github.verifier, "github-example-secret"),
        Some(0)
    );
    // Header names are normalised to lowercase.
    assert_eq!(
        github.fields,
        FieldSources {
            event_id: Some(header("x-github-delivery")),
            event_type: header("x-github-event"),
            domain: None,
            entity_id: json("/repository/full_name"),
            entity_version: None,
        }
    );

    let shop = provider(&config, "shop");
    assert_eq!(shop.verifier.scheme, Scheme::Shopify);
    assert_eq!(
        accepting_key(&shop.verifier, "shop-example-secret"),
        Some(0)
    );
    assert_eq!(
        shop.fields,
        FieldSources {
            event_id: Some(header("x-shopify-webhook-id")),
            event_type: header("x-shopify-topic"),
            domain: None,
            entity_id: json("/id"),
            entity_version: None,
        }
    );
}

#[test]
fn example_with_crm_secret_set_has_both_rotation_secrets_and_no_warning() {
    let mut env = example_env();
    env.push(("CRM_SECRET", CRM_ROTATED));
    let config = load_ok(EXAMPLE, &vars(&env));

    assert_eq!(config.warnings, Vec::<String>::new());
    let crm = provider(&config, "crm");
    assert_eq!(crm.verifier.secrets.len(), 2);
    // Order is the file's: the env secret first, the literal second.
    assert_eq!(accepting_key(&crm.verifier, CRM_ROTATED), Some(0));
    assert_eq!(accepting_key(&crm.verifier, CRM_LITERAL), Some(1));
}

#[test]
fn example_loads_through_load_file_with_its_path_as_origin() {
    let config = Config::load_file(Path::new(EXAMPLE_PATH), &vars(&example_env()))
        .unwrap_or_else(|e| panic!("example should load: {e}"));
    assert_eq!(config.origin, Origin::File(PathBuf::from(EXAMPLE_PATH)));
    assert_eq!(names(&config), ["crm", "github", "shop", "stripe"]);
}

#[test]
fn a_missing_file_is_a_read_error_naming_it() {
    let path = Path::new("/nonexistent/hookmesh-test/hookmesh.toml");
    let err = Config::load_file(path, &Env::default()).unwrap_err();
    assert!(matches!(&err, ConfigError::Read { path: p, .. } if p == path));
    assert_eq!(
        err.to_string(),
        "cannot read /nonexistent/hookmesh-test/hookmesh.toml: \
         No such file or directory (os error 2)"
    );
}

#[test]
fn example_without_stripe_secret_fails_naming_key_and_variable() {
    let env: Vec<_> = example_env()
        .into_iter()
        .filter(|(k, _)| *k != "STRIPE_SECRET")
        .collect();
    let err = load_err(EXAMPLE, &vars(&env));
    assert!(matches!(&err, ConfigError::Invalid { key, .. } if key == "providers.stripe.secrets"));
    assert_eq!(
        err.to_string(),
        "hookmesh.toml: providers.stripe.secrets: \
         no secret available: environment variable STRIPE_SECRET not set"
    );
}

#[test]
fn an_empty_env_secret_counts_as_unset() {
    let env: Vec<_> = example_env()
        .into_iter()
        .map(|(k, v)| {
            if k == "STRIPE_SECRET" {
                (k, "")
            } else {
                (k, v)
            }
        })
        .collect();
    assert_eq!(
        load_err(EXAMPLE, &vars(&env)).to_string(),
        "hookmesh.toml: providers.stripe.secrets: \
         no secret available: environment variable STRIPE_SECRET not set"
    );
}

#[test]
fn a_crm_secret_from_env_that_is_not_base64_fails_naming_its_index() {
    let mut env = example_env();
    env.push(("CRM_SECRET", "whsec_***"));
    assert_eq!(
        load_err(EXAMPLE, &vars(&env)).to_string(),
        "hookmesh.toml: providers.crm.secrets[0]: \
         secret is not valid base64 (invalid character at offset 0)"
    );
}

// ---------------------------------------------------------------------------
// The built-in development config

#[test]
fn dev_config_loads_with_an_empty_env() {
    let config = Config::from_toml(DEV_CONFIG, Origin::Builtin, &Env::default())
        .unwrap_or_else(|e| panic!("dev config should load: {e}"));

    assert_eq!(config.origin, Origin::Builtin);
    assert_eq!(config.warnings, Vec::<String>::new());
    assert_eq!(config.nats.urls, ["nats://127.0.0.1:4222"]);
    assert_eq!(
        config.http.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.http.max_body_bytes, 1024 * 1024 - 8 * 1024);
    assert_eq!(config.ingest.partitions, 16);
    assert_eq!(config.ingest.duplicate_window, Duration::from_secs(120));

    assert_eq!(names(&config), ["crm"]);
    let crm = provider(&config, "crm");
    assert_eq!(crm.verifier.scheme, Scheme::StandardWebhooks);
    assert_eq!(crm.verifier.secrets.len(), 1);
    assert_eq!(accepting_key(&crm.verifier, CRM_LITERAL), Some(0));
    assert_eq!(crm.fields.event_type, json("/type"));
    assert_eq!(crm.fields.entity_version, Some(json("/data/version")));
}

#[test]
fn builtin_origin_is_named_in_errors() {
    let err = Config::from_toml(
        &format!("{DEV_CONFIG}\n[ingest]\npartitions = 0\n"),
        Origin::Builtin,
        &vars(&[]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "built-in development config: ingest.partitions: must be between 1 and 4096"
    );
}

// ---------------------------------------------------------------------------
// Environment overrides

#[test]
fn env_overrides_replace_file_values() {
    let env = vars(&[
        ("HOOKMESH_NATS_URL", "nats://nats.internal:4222"),
        ("HOOKMESH_HTTP_LISTEN", "0.0.0.0:9090"),
        ("HOOKMESH_HTTP_MAX_BODY_BYTES", "2048"),
        ("HOOKMESH_INGEST_PARTITIONS", "8"),
        ("HOOKMESH_INGEST_DUPLICATE_WINDOW", "90s"),
        ("HOOKMESH_PROVIDERS_CRM_TOLERANCE", "1m"),
        (
            "HOOKMESH_PROVIDERS_CRM_SECRETS",
            &format!(r#"["env:A", "{CRM_LITERAL}"]"#),
        ),
        ("A", CRM_ROTATED),
        // Reserved: not overrides, and not errors.
        ("HOOKMESH_LOG", "debug"),
        ("HOOKMESH_CONFIG", "/etc/hookmesh.toml"),
        ("HOOKMESH_ACTOR", "ops"),
        // Not the prefix.
        ("HOOKMESHNATS_URL", "nats://ignored:4222"),
        ("PATH", "/usr/bin"),
    ]);
    let config = Config::from_toml(DEV_CONFIG, Origin::Builtin, &env)
        .unwrap_or_else(|e| panic!("overrides should apply: {e}"));

    assert_eq!(config.nats.urls, ["nats://nats.internal:4222"]);
    assert_eq!(
        config.http.listen,
        "0.0.0.0:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.http.max_body_bytes, 2048);
    assert_eq!(config.ingest.partitions, 8);
    assert_eq!(config.ingest.duplicate_window, Duration::from_secs(90));

    let crm = provider(&config, "crm");
    assert_eq!(crm.verifier.tolerance, Duration::from_secs(60));
    assert_eq!(crm.verifier.secrets.len(), 2);
    assert_eq!(accepting_key(&crm.verifier, CRM_ROTATED), Some(0));
    assert_eq!(accepting_key(&crm.verifier, CRM_LITERAL), Some(1));
    // Keys the env did not touch keep the file's values.
    assert_eq!(crm.fields.entity_version, Some(json("/data/version")));
    assert_eq!(config.warnings, Vec::<String>::new());
}

#[test]
fn env_overrides_parse_strings_as_numbers_and_booleans() {
    let config = load_ok(
        "[ingest]\npartitions = 16\n",
        &vars(&[
            ("HOOKMESH_INGEST_PARTITIONS", " 32 "),
            ("HOOKMESH_NATS_TLS_REQUIRED", "true"),
        ]),
    );
    assert_eq!(config.ingest.partitions, 32);
    assert!(config.nats.tls_required);
}

#[test]
fn env_can_create_a_whole_provider() {
    let config = Config::from_toml(
        DEV_CONFIG,
        Origin::Builtin,
        &vars(&[
            ("HOOKMESH_PROVIDERS_BILLING_SCHEME", "github"),
            ("HOOKMESH_PROVIDERS_BILLING_SECRETS", "s3cret"),
        ]),
    )
    .unwrap_or_else(|e| panic!("env provider should load: {e}"));

    assert_eq!(names(&config), ["billing", "crm"]);
    let billing = provider(&config, "billing");
    assert_eq!(billing.name, "billing");
    assert_eq!(billing.verifier.scheme, Scheme::Github);
    assert_eq!(billing.verifier.secrets.len(), 1);
    assert_eq!(accepting_key(&billing.verifier, "s3cret"), Some(0));
    assert_eq!(billing.fields.event_type, header("x-github-event"));
    assert_eq!(billing.fields.entity_id, json("/repository/full_name"));
}

#[test]
fn env_reaches_a_provider_whose_name_has_a_dash() {
    let file = r#"
[providers.my-erp]
scheme = "shopify"
secrets = ["erp-secret"]
tolerance = "2m"
"#;
    let config = load_ok(
        file,
        &vars(&[
            ("HOOKMESH_PROVIDERS_MY_ERP_TOLERANCE", "10m"),
            // A key that itself contains `_`.
            ("HOOKMESH_PROVIDERS_MY_ERP_ENTITY_ID", "json:/order/id"),
        ]),
    );
    assert_eq!(names(&config), ["my-erp"]);
    let erp = provider(&config, "my-erp");
    assert_eq!(erp.verifier.tolerance, Duration::from_secs(600));
    assert_eq!(erp.fields.entity_id, json("/order/id"));
    assert_eq!(erp.fields.event_type, header("x-shopify-topic"));
}

#[test]
fn env_nats_url_with_commas_is_a_list() {
    let config = load_ok(
        "",
        &vars(&[("HOOKMESH_NATS_URL", "nats://a:4222,nats://b:4222")]),
    );
    assert_eq!(config.nats.urls, ["nats://a:4222", "nats://b:4222"]);

    let config = load_ok(
        "",
        &vars(&[("HOOKMESH_NATS_URL", " nats://a:4222 , ,nats://b:4222 ")]),
    );
    assert_eq!(config.nats.urls, ["nats://a:4222", "nats://b:4222"]);

    let config = load_ok(
        "",
        &vars(&[("HOOKMESH_NATS_URL", r#"["nats://a:4222", "nats://b:4222"]"#)]),
    );
    assert_eq!(config.nats.urls, ["nats://a:4222", "nats://b:4222"]);
}

#[test]
fn env_unknown_key_in_a_known_section_fails_naming_the_key() {
    let err = load_err("", &vars(&[("HOOKMESH_NATS_BOGUS", "1")]));
    let ConfigError::Invalid {
        key,
        message,
        origin,
    } = &err
    else {
        panic!("expected an Invalid error, got {err:?}");
    };
    assert_eq!(key, "nats.bogus");
    assert_eq!(
        origin, "HOOKMESH_NATS_BOGUS",
        "the variable is blamed, not the file"
    );
    assert!(
        message.starts_with("unknown field `bogus`, expected one of `url`"),
        "{message}"
    );
}

#[test]
fn env_unknown_section_fails_naming_the_variable() {
    let err = load_err("", &vars(&[("HOOKMESH_WHATEVER_X", "1")]));
    assert!(matches!(&err, ConfigError::Env { var, .. } if var == "HOOKMESH_WHATEVER_X"));
    assert_eq!(
        err.to_string(),
        r#"HOOKMESH_WHATEVER_X: unknown section "whatever""#
    );
}

#[test]
fn env_malformed_variables_fail_naming_the_variable() {
    let cases = [
        (
            "HOOKMESH_NATS",
            "1",
            "HOOKMESH_NATS: expected HOOKMESH_<SECTION>_<KEY>",
        ),
        (
            "HOOKMESH_PROVIDERS_CRM_BOGUS",
            "1",
            "HOOKMESH_PROVIDERS_CRM_BOGUS: expected HOOKMESH_PROVIDERS_<NAME>_<KEY>, KEY one of \
             [\"scheme\", \"secrets\", \"event_id\", \"event_type\", \"domain\", \"entity_id\", \
             \"entity_version\", \"tolerance\", \"signature_header\", \"encoding\", \"prefix\", \
             \"timestamp_header\"]",
        ),
        (
            "HOOKMESH_PROVIDERS_CRM_SECRETS",
            r#"["a", "#,
            "HOOKMESH_PROVIDERS_CRM_SECRETS: not a TOML array: unclosed array, expected `]`",
        ),
    ];
    for (var, value, expected) in cases {
        let err = load_err(DEV_CONFIG, &vars(&[(var, value)]));
        assert!(
            matches!(&err, ConfigError::Env { var: v, .. } if v == var),
            "{err:?}"
        );
        assert_eq!(err.to_string(), expected);
    }
    // A provider variable with no name before the key.
    let err = load_err("", &vars(&[("HOOKMESH_PROVIDERS_SCHEME", "github")]));
    assert!(matches!(&err, ConfigError::Env { var, .. } if var == "HOOKMESH_PROVIDERS_SCHEME"));
}

// ---------------------------------------------------------------------------
// Golden bad configs

#[test]
fn invalid_configs_fail_with_their_golden_message() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(GOLDEN_DIR)
        .expect("golden directory")
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    cases.sort();

    let mut checked = 0;
    let mut failures = Vec::new();
    for path in &cases {
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        match ext {
            "toml" => {}
            "err" => {
                assert!(
                    path.with_extension("toml").exists(),
                    "{} has no .toml",
                    path.display()
                );
                continue;
            }
            _ => panic!("unexpected file {}", path.display()),
        }
        let text = std::fs::read_to_string(path).expect("read case");
        let expected = std::fs::read_to_string(path.with_extension("err"))
            .unwrap_or_else(|e| panic!("{}: no .err beside it: {e}", path.display()));
        let expected = expected.strip_suffix('\n').unwrap_or(&expected);
        let case = path.file_stem().unwrap().to_string_lossy();
        match load(&text, &Env::default()) {
            Ok(_) => failures.push(format!("{case}: loaded, expected: {expected}")),
            Err(e) if e.to_string() != expected => {
                failures.push(format!("{case}:\n  expected: {expected}\n  actual:   {e}"))
            }
            Err(_) => {}
        }
        checked += 1;
    }
    assert!(
        checked >= 25,
        "only {checked} golden cases found in {GOLDEN_DIR}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_toml_is_a_syntax_error_naming_the_origin() {
    let err = load_err("[nats]\nurl = \"nats://127.0.0.1:4222\n", &Env::default());
    let ConfigError::Syntax { origin, message } = &err else {
        panic!("expected a Syntax error, got {err:?}");
    };
    assert_eq!(origin, FILE);
    assert!(!message.is_empty());
    assert!(
        err.to_string()
            .starts_with("hookmesh.toml is not valid TOML: "),
        "{err}"
    );
}

#[test]
fn provider_names_with_a_dot_space_or_nothing_are_rejected() {
    for name in ["a.b", "a b", "", "crm/x"] {
        let text = format!("[providers.\"{name}\"]\nscheme = \"github\"\nsecrets = [\"s\"]\n");
        let err = load_err(&text, &Env::default());
        let ConfigError::Invalid { message, .. } = &err else {
            panic!("{name:?}: expected an Invalid error, got {err:?}");
        };
        assert_eq!(
            message, "a provider name may only contain letters, digits, '_' and '-'",
            "{name:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Validation details

#[test]
fn ingest_bounds_are_inclusive() {
    let config = load_ok(
        "[ingest]\nidempotency_ttl = \"1d\"\npartitions = 1\npublish_timeout = \"10ms\"\n\
         duplicate_window = \"1s\"\n",
        &Env::default(),
    );
    assert_eq!(config.ingest.idempotency_ttl, Duration::from_secs(86_400));
    assert_eq!(config.ingest.partitions, 1);
    assert_eq!(config.ingest.publish_timeout, Duration::from_millis(10));
    assert_eq!(config.ingest.duplicate_window, Duration::from_secs(1));

    let config = load_ok(
        "[ingest]\nidempotency_ttl = \"30d\"\npartitions = 4096\nmax_age = \"2m\"\n\
         duplicate_window = \"2m\"\n",
        &Env::default(),
    );
    assert_eq!(
        config.ingest.idempotency_ttl,
        Duration::from_secs(30 * 86_400)
    );
    assert_eq!(config.ingest.partitions, 4096);
    assert_eq!(config.ingest.max_age, Duration::from_secs(120));

    let cases = [
        (
            "partitions = 4097",
            "hookmesh.toml: ingest.partitions: must be between 1 and 4096",
        ),
        (
            "publish_timeout = \"9ms\"",
            "hookmesh.toml: ingest.publish_timeout: must be at least 10ms",
        ),
        (
            "duplicate_window = \"0s\"",
            "hookmesh.toml: ingest.duplicate_window: must be at least 1s",
        ),
        (
            "idempotency_ttl = \"23h 59m 59s\"",
            "hookmesh.toml: ingest.idempotency_ttl: must be between 1d and 30d",
        ),
    ];
    for (line, expected) in cases {
        let err = load_err(&format!("[ingest]\n{line}\n"), &Env::default());
        assert_eq!(err.to_string(), expected, "{line}");
    }
}

#[test]
fn retry_after_is_at_least_one_second() {
    let config = load_ok("[ingest]\nretry_after = \"0s\"\n", &Env::default());
    assert_eq!(config.ingest.retry_after, Duration::from_secs(1));
    let config = load_ok("[ingest]\nretry_after = \"30s\"\n", &Env::default());
    assert_eq!(config.ingest.retry_after, Duration::from_secs(30));
}

#[test]
fn an_empty_file_gives_the_defaults() {
    let config = load_ok("", &Env::default());
    assert_eq!(config.nats.urls, ["nats://127.0.0.1:4222"]);
    assert_eq!(
        config.http.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.http.max_body_bytes, 1024 * 1024 - 8 * 1024);
    assert_eq!(config.ingest.duplicate_window, Duration::from_secs(120));
    assert_eq!(
        config.ingest.idempotency_ttl,
        Duration::from_secs(7 * 86_400)
    );
    assert_eq!(config.ingest.publish_timeout, Duration::from_secs(5));
    assert_eq!(config.ingest.retry_after, Duration::from_secs(5));
    assert_eq!(config.ingest.max_age, Duration::from_secs(7 * 86_400));
    assert_eq!(config.ingest.partitions, 16);
    assert!(config.providers.is_empty());
}

#[test]
fn hmac_sha256_provider_takes_its_settings() {
    let file = r#"
[providers.acme]
scheme = "hmac-sha256"
secrets = ["acme-secret"]
signature_header = "X-Acme-Signature"
encoding = "base64"
prefix = ""
timestamp_header = "X-Acme-Timestamp"
event_type = "header:X-Acme-Event"
entity_id = "json:/id"
"#;
    let config = load_ok(file, &Env::default());
    let acme = provider(&config, "acme");
    assert_eq!(
        acme.verifier.scheme,
        Scheme::Hmac(GenericHmac {
            signature_header: "X-Acme-Signature".into(),
            encoding: Encoding::Base64,
            // An empty prefix is no prefix.
            prefix: None,
            timestamp_header: Some("X-Acme-Timestamp".into()),
        })
    );
    assert_eq!(accepting_key(&acme.verifier, "acme-secret"), Some(0));
    // No per-scheme defaults for the generic scheme.
    assert_eq!(
        acme.fields,
        FieldSources {
            event_id: None,
            event_type: header("x-acme-event"),
            domain: None,
            entity_id: json("/id"),
            entity_version: None,
        }
    );

    let plain = file
        .replace("encoding = \"base64\"\n", "")
        .replace("prefix = \"\"\n", "prefix = \"sha256=\"\n");
    let config = load_ok(&plain, &Env::default());
    let Scheme::Hmac(generic) = &provider(&config, "acme").verifier.scheme else {
        panic!("expected the generic scheme");
    };
    assert_eq!(generic.encoding, Encoding::Hex);
    assert_eq!(generic.prefix.as_deref(), Some("sha256="));
}

#[test]
fn parse_source_accepts_headers_and_pointers() {
    assert_eq!(parse_source("header:X-Event"), Ok(header("x-event")));
    assert_eq!(parse_source("json:/a/b~1c"), Ok(json("/a/b~1c")));
    assert_eq!(
        parse_source("json:a"),
        Err(r#""a" is not a JSON pointer (RFC 6901): it must start with '/'"#.to_string())
    );
    assert_eq!(
        parse_source("header:"),
        Err(r#""" is not a valid header name"#.to_string())
    );
    assert_eq!(
        parse_source("/type"),
        Err(r#""/type" must be "header:NAME" or "json:/pointer""#.to_string())
    );
    assert_eq!(header("x-event").to_string(), "header:x-event");
    assert_eq!(json("/type").to_string(), "json:/type");
}

// ---------------------------------------------------------------------------
// Secrets

#[test]
fn a_file_secret_is_read_without_its_trailing_newline() {
    let secret = TempFile::new("github", "github-file-secret\r\n");
    let file = format!(
        "[providers.gh]\nscheme = \"github\"\nsecrets = [{:?}]\n",
        secret.reference()
    );
    let config = load_ok(&file, &Env::default());
    let gh = provider(&config, "gh");
    assert_eq!(gh.verifier.secrets.len(), 1);
    assert_eq!(accepting_key(&gh.verifier, "github-file-secret"), Some(0));
    assert_eq!(accepting_key(&gh.verifier, "github-file-secret\r\n"), None);
    assert_eq!(config.warnings, Vec::<String>::new());
}

#[test]
fn an_empty_file_secret_is_an_error() {
    let secret = TempFile::new("empty", "\n");
    let file = format!(
        "[providers.gh]\nscheme = \"github\"\nsecrets = [{:?}]\n",
        secret.reference()
    );
    assert_eq!(
        load_err(&file, &Env::default()).to_string(),
        format!(
            "hookmesh.toml: providers.gh.secrets[0]: secret file {} is empty",
            secret.0.display()
        )
    );
}

#[test]
fn nats_secrets_resolve_from_env_and_file() {
    let password = TempFile::new("nats-password", "nats-file-password\n");
    let file = format!(
        "[nats]\nuser = \"hookmesh\"\npassword = {:?}\n",
        password.reference()
    );
    let config = load_ok(&file, &Env::default());
    assert_eq!(
        config.nats.auth,
        NatsAuth::UserPassword {
            user: "hookmesh".into(),
            password: Redacted("nats-file-password".into())
        }
    );
    let file = "[nats]\ntoken = \"env:NATS_TOKEN\"\n";
    let config = load_ok(file, &vars(&[("NATS_TOKEN", "nats-env-token")]));
    assert_eq!(
        config.nats.auth,
        NatsAuth::Token(Redacted("nats-env-token".into()))
    );

    // A NATS secret has no alternative: an unset variable is an error.
    assert_eq!(
        load_err(file, &Env::default()).to_string(),
        "hookmesh.toml: nats.token: environment variable NATS_TOKEN is not set"
    );
}

#[test]
fn debug_output_of_a_config_never_shows_secrets() {
    let shop_secret = TempFile::new("shop", "shop-file-secret-4711\n");
    let file = format!(
        r#"
[nats]
user = "hookmesh"
password = "nats-literal-password-4711"

[providers.crm]
scheme = "standard-webhooks"
secrets = ["{CRM_ROTATED}", "env:CRM_SECRET"]

[providers.gh]
scheme = "github"
secrets = ["env:GH_SECRET", "github-literal-secret-4711"]

[providers.shop]
scheme = "shopify"
secrets = [{:?}]

[providers.acme]
scheme = "hmac-sha256"
secrets = ["acme-literal-secret-4711"]
signature_header = "X-Signature"
event_type = "json:/type"
entity_id = "json:/id"
"#,
        shop_secret.reference()
    );
    let env = vars(&[
        ("CRM_SECRET", CRM_LITERAL),
        ("GH_SECRET", "github-env-secret-4711"),
    ]);
    let config = load_ok(&file, &env);
    assert_eq!(config.providers.len(), 4);

    let secrets = [
        "nats-literal-password-4711",
        CRM_ROTATED,
        CRM_LITERAL,
        // The decoded key bytes of CRM_ROTATED, and its base64 body alone.
        "crm-rotated-key-bytes",
        "Y3JtLXJvdGF0ZWQta2V5LWJ5dGVz",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "github-env-secret-4711",
        "github-literal-secret-4711",
        "shop-file-secret-4711",
        "acme-literal-secret-4711",
        // What `Vec<u8>`'s Debug would start with for "github-...".
        "[103, 105, 116",
    ];
    for output in [format!("{config:?}"), format!("{config:#?}")] {
        for secret in secrets {
            assert!(
                !output.contains(secret),
                "Debug output shows {secret:?}:\n{output}"
            );
        }
        assert!(output.contains("<redacted>"), "{output}");
        assert!(output.contains("SecretKey(..)"), "{output}");
        // Non-secret settings still show.
        assert!(output.contains(r#""hookmesh""#), "{output}");
    }
    assert_eq!(format!("{:?}", Redacted("x".into())), "<redacted>");
}

#[test]
fn bad_override_values_name_the_variable() {
    let err = load_err(
        DEV_CONFIG,
        &vars(&[("HOOKMESH_INGEST_PARTITIONS", "eight")]),
    );
    assert_eq!(
        err.to_string(),
        "HOOKMESH_INGEST_PARTITIONS: ingest.partitions: expected a whole number, 0 or more, found \"eight\""
    );
    let err = load_err(
        DEV_CONFIG,
        &vars(&[("HOOKMESH_PROVIDERS_CRM_TOLERANCE", "0s")]),
    );
    assert_eq!(
        err.to_string(),
        "HOOKMESH_PROVIDERS_CRM_TOLERANCE: providers.crm.tolerance: must be at least 1s"
    );
}

// ---------------------------------------------------------------------------
// [admin] and [log]

#[test]
fn the_admin_listener_defaults_to_loopback_9464_without_a_token() {
    let config = load_ok("", &Env::default());
    assert_eq!(config.admin.listen, "127.0.0.1:9464".parse().expect("addr"));
    assert!(config.admin.token.is_none());
    assert_eq!(config.log.format, LogFormat::Human);
}

#[test]
fn the_admin_token_comes_from_the_environment_or_a_file_and_never_shows() {
    let env = vars(&[("ADMIN_TOKEN", "a-long-enough-admin-token")]);
    let config = load_ok(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:ADMIN_TOKEN\"\n",
        &env,
    );
    assert_eq!(
        config.admin.token,
        Some(Redacted("a-long-enough-admin-token".into()))
    );
    assert!(!format!("{config:?}").contains("a-long-enough-admin-token"));

    let file = TempFile::new("admin-token", "token-from-a-file-0123\n");
    let config = load_ok(
        &format!("[admin]\ntoken = \"{}\"\n", file.reference()),
        &Env::default(),
    );
    assert_eq!(
        config.admin.token,
        Some(Redacted("token-from-a-file-0123".into()))
    );
}

#[test]
fn admin_and_log_take_environment_overrides() {
    let env = vars(&[
        ("HOOKMESH_ADMIN_LISTEN", "127.0.0.1:19464"),
        ("HOOKMESH_LOG_FORMAT", "json"),
    ]);
    let config = load_ok("", &env);
    assert_eq!(
        config.admin.listen,
        "127.0.0.1:19464".parse().expect("addr")
    );
    assert_eq!(config.log.format, LogFormat::Json);
}

#[test]
fn telemetry_is_off_in_the_example_and_takes_environment_overrides() {
    let example = load_ok(EXAMPLE, &vars(&example_env()));
    assert_eq!(example.telemetry.otlp_endpoint, None);
    let env = vars(&[
        ("HOOKMESH_TELEMETRY_OTLP_ENDPOINT", "http://collector:4318"),
        ("HOOKMESH_TELEMETRY_SERVICE_NAME", "hookmesh-eu"),
    ]);
    let config = load_ok("[telemetry]\nservice_name = \"edge\"\n", &env);
    assert_eq!(
        config.telemetry.otlp_endpoint.as_deref(),
        Some("http://collector:4318/v1/traces")
    );
    assert_eq!(config.telemetry.service_name, "hookmesh-eu");
}
