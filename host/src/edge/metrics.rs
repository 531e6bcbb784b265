//! The HTTP edge's Prometheus metrics, registered into the host's
//! [`Metrics`](crate::metrics::Metrics).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which listener: `webhook` or `admin`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// The listener.
    pub listener: &'static str,
}

/// A connection the edge closed, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabel {
    /// The listener.
    pub listener: &'static str,
    /// `header_timeout` (a slow request header), `request_timeout` (a slow
    /// body, or a request not answered in time) or `idle_timeout` (a
    /// keep-alive connection without a next request).
    pub reason: &'static str,
}

/// Why the edge closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The request header did not arrive within `http.header_read_timeout`.
    HeaderTimeout,
    /// The request was not done within `http.request_timeout`.
    RequestTimeout,
    /// No request within `http.idle_timeout`.
    IdleTimeout,
}

impl CloseReason {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::RequestTimeout => "request_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
        }
    }
}

/// The edge metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct EdgeMetrics {
    open: Family<ListenerLabel, Gauge>,
    closed: Family<ClosedLabel, Counter>,
}

impl EdgeMetrics {
    /// Registers the edge metrics in `registry` (prefixed `http_`).
    pub fn register(registry: &mut Registry) -> EdgeMetrics {
        let metrics = EdgeMetrics {
            open: Family::default(),
            closed: Family::default(),
        };
        let http = registry.sub_registry_with_prefix("http");
        http.register(
            "connections",
            "Connections being served now, by listener",
            metrics.open.clone(),
        );
        http.register(
            "connections_closed",
            "Connections the host closed at a limit: slow headers, slow bodies, idle keep-alive",
            metrics.closed.clone(),
        );
        metrics
    }

    /// Counts a connection closed at a limit.
    pub fn closed(&self, listener: &'static str, reason: CloseReason) {
        self.closed
            .get_or_create(&ClosedLabel {
                listener,
                reason: reason.label(),
            })
            .inc();
    }

    /// Marks a connection open until the guard drops.
    pub fn open(&self, listener: &'static str) -> OpenConnection {
        let gauge = self.open.get_or_create(&ListenerLabel { listener }).clone();
        gauge.inc();
        OpenConnection(gauge)
    }
}

/// An open connection, counted in `hookmesh_http_connections` while it lives.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
