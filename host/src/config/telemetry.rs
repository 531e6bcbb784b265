//! `[telemetry]`: OpenTelemetry traces over OTLP/HTTP (protobuf), off
//! unless an endpoint is given.
//!
//! ```toml
//! [telemetry]
//! otlp_endpoint = "http://127.0.0.1:4318"   # the collector; /v1/traces is added
//! service_name = "hookmesh"                  # default: OTEL_SERVICE_NAME, else "hookmesh"
//! export_interval = "5s"                     # how often a batch of spans is sent
//! resource = { "deployment.environment" = "prod" }
//! ```
//!
//! Without `otlp_endpoint` the standard variables turn traces on:
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the whole URL) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (a base, `/v1/traces` added).
//! `OTEL_SDK_DISABLED=true` turns them off whatever is configured.
//! `HOOKMESH_TELEMETRY_<KEY>` overrides a key like any other section's.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{Env, Humane, KeyError};

/// The service name spans carry when neither the file nor
/// `OTEL_SERVICE_NAME` names one.
pub const DEFAULT_SERVICE_NAME: &str = "hookmesh";

/// How often spans are sent when not configured (OpenTelemetry's default).
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(5);

/// The path of the trace signal under an OTLP/HTTP base URL.
pub const TRACES_PATH: &str = "/v1/traces";

/// `[telemetry]`, resolved.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// Where spans are POSTed (the whole URL, `…/v1/traces`); `None`:
    /// tracing is off and costs nothing.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// More resource attributes (`deployment.environment`, `host.name`, …).
    pub resource: BTreeMap<String, String>,
    /// How often a batch of finished spans is sent.
    pub export_interval: Duration,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTelemetry {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
    resource: BTreeMap<String, String>,
    export_interval: Option<Humane>,
}

impl RawTelemetry {
    pub(super) fn resolve(self, env: &Env) -> Result<TelemetryConfig, KeyError> {
        let configured = self.otlp_endpoint.filter(|e| !e.trim().is_empty());
        let endpoint = match configured {
            Some(base) => {
                Some(traces_url(&base).map_err(|m| ("telemetry.otlp_endpoint".into(), m))?)
            }
            None => from_env(env)?,
        };
        let disabled = env
            .get("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let service_name = self
            .service_name
            .or_else(|| env.get("OTEL_SERVICE_NAME").map(str::to_string))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
        if let Some(key) = self.resource.keys().find(|k| k.trim().is_empty()) {
            return Err((
                "telemetry.resource".into(),
                format!("attribute name {key:?} is empty"),
            ));
        }
        let export_interval = self
            .export_interval
            .map_or(DEFAULT_EXPORT_INTERVAL, |h| h.0);
        if export_interval.is_zero() {
            return Err((
                "telemetry.export_interval".into(),
                "must be more than 0".into(),
            ));
        }
        Ok(TelemetryConfig {
            otlp_endpoint: endpoint.filter(|_| !disabled),
            service_name,
            resource: self.resource,
            export_interval,
        })
    }
}

/// The endpoint the standard OpenTelemetry variables give, if any.
fn from_env(env: &Env) -> Result<Option<String>, KeyError> {
    let set = |name: &str| env.get(name).map(str::trim).filter(|v| !v.is_empty());
    if let Some(url) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        check_http(url).map_err(|m| ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(), m))?;
        return Ok(Some(url.to_string()));
    }
    match set("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(base) => traces_url(base)
            .map(Some)
            .map_err(|m| ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), m)),
        None => Ok(None),
    }
}

/// `base` with the trace signal's path, as OTLP/HTTP exporters build it:
/// `http://collector:4318` → `http://collector:4318/v1/traces`.
fn traces_url(base: &str) -> Result<String, String> {
    let base = base.trim();
    check_http(base)?;
    Ok(format!("{}{TRACES_PATH}", base.trim_end_matches('/')))
}

/// Spans go over plain HTTP: to a collector on the same host or network,
/// which forwards them on over TLS when it must.
fn check_http(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            format!(
                "{url:?}: only http:// is supported; send spans to a collector near the host \
                 (e.g. an OpenTelemetry Collector or Jaeger on port 4318)"
            )
        } else {
            format!("{url:?} is not an http:// URL")
        });
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    url.parse::<http::Uri>()
        .map(drop)
        .map_err(|e| format!("{url:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml: &str, env: &[(&str, &str)]) -> Result<TelemetryConfig, KeyError> {
        let raw: RawTelemetry = toml::from_str(toml).expect("toml");
        raw.resolve(&Env::from_pairs(env.iter().copied()))
    }

    #[test]
    fn off_by_default() {
        let config = resolve("", &[]).expect("valid");
        assert_eq!(config.otlp_endpoint, None);
        assert_eq!(config.service_name, "hookmesh");
        assert_eq!(config.export_interval, DEFAULT_EXPORT_INTERVAL);
    }

    #[test]
    fn the_file_names_a_base_and_the_trace_path_is_added() {
        let config = resolve(
            "otlp_endpoint = \"http://127.0.0.1:4318/\"\nservice_name = \"edge\"\nexport_interval = \"200ms\"\nresource = { \"deployment.environment\" = \"test\" }",
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4318")],
        )
        .expect("valid");
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(config.service_name, "edge");
        assert_eq!(config.export_interval, Duration::from_millis(200));
        assert_eq!(config.resource["deployment.environment"], "test");
    }

    #[test]
    fn the_standard_variables_apply_when_the_file_is_silent() {
        let base = resolve(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                ("OTEL_SERVICE_NAME", "hookmesh-eu"),
            ],
        )
        .expect("valid");
        assert_eq!(
            base.otlp_endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(base.service_name, "hookmesh-eu");
        let whole = resolve(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:4318/in",
                ),
            ],
        )
        .expect("valid");
        assert_eq!(
            whole.otlp_endpoint.as_deref(),
            Some("http://traces:4318/in")
        );
        let disabled = resolve(
            "otlp_endpoint = \"http://127.0.0.1:4318\"",
            &[("OTEL_SDK_DISABLED", "true")],
        )
        .expect("valid");
        assert_eq!(disabled.otlp_endpoint, None);
    }

    #[test]
    fn bad_endpoints_are_refused_with_their_key() {
        let https = resolve("otlp_endpoint = \"https://collector:4318\"", &[]).unwrap_err();
        assert_eq!(https.0, "telemetry.otlp_endpoint");
        assert!(https.1.contains("only http://"), "{}", https.1);
        let env = resolve("", &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]).unwrap_err();
        assert_eq!(env.0, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let zero = resolve("export_interval = \"0s\"", &[]).unwrap_err();
        assert_eq!(zero.0, "telemetry.export_interval");
    }
}
