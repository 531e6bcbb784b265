//! Credentials the host adds to outgoing requests (`[[outgoing.credentials]]`
//! in the host's config): the secret never enters a guest, and a request
//! only carries it to the destination it was configured for — after the
//! manifest's `allowed_hosts` let the request through.

use http::{HeaderName, HeaderValue};

use super::{AllowedHosts, Destination};

/// One header added to requests to one destination.
#[derive(Debug, Clone)]
pub struct Credential {
    /// Where requests get it (one `allowed_hosts`-style entry).
    pub destination: AllowedHosts,
    /// The header's name.
    pub header: HeaderName,
    /// The secret value (marked sensitive: never printed).
    pub value: HeaderValue,
    /// Only these handlers' requests; `None`: every handler's.
    pub handlers: Option<Vec<String>>,
}

impl Credential {
    fn applies(&self, handler: &str, to: &Destination) -> bool {
        self.handlers
            .as_ref()
            .is_none_or(|names| names.iter().any(|name| name == handler))
            && self.destination.allowing(to).is_some()
    }
}

/// Every configured credential, in config order.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Vec<Credential>);

impl Credentials {
    /// The credentials, in the order the config lists them; their values
    /// are marked sensitive (no `Debug` of a header map shows them).
    pub fn new(mut credentials: Vec<Credential>) -> Credentials {
        for credential in &mut credentials {
            credential.value.set_sensitive(true);
        }
        Credentials(credentials)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets each credential for `handler`'s request to `to`, replacing a
    /// header of the same name the guest set (the first matching entry
    /// wins). Returns the names of the headers set, for the log.
    pub fn apply(
        &self,
        handler: &str,
        to: &Destination,
        headers: &mut http::HeaderMap,
    ) -> Vec<HeaderName> {
        let mut set: Vec<HeaderName> = Vec::new();
        for credential in self.0.iter().filter(|c| c.applies(handler, to)) {
            if set.contains(&credential.header) {
                continue;
            }
            headers.insert(credential.header.clone(), credential.value.clone());
            set.push(credential.header.clone());
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::http::Scheme;

    fn credential(entry: &str, header: &str, value: &str, handlers: Option<&[&str]>) -> Credential {
        Credential {
            destination: AllowedHosts::parse(&[entry.to_string()]).expect("entry"),
            header: HeaderName::from_bytes(header.as_bytes()).expect("name"),
            value: HeaderValue::from_str(value).expect("value"),
            handlers: handlers.map(|h| h.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn to(host: &str, port: u16) -> Destination {
        Destination {
            scheme: Scheme::Https,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn a_credential_reaches_only_its_destination_and_its_handlers() {
        let credentials = Credentials::new(vec![
            credential(
                "https://erp.example.com",
                "authorization",
                "Bearer e",
                Some(&["order-sync"]),
            ),
            credential("https://*.crm.example.com", "x-api-key", "k", None),
        ]);
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            credentials.apply("order-sync", &to("erp.example.com", 443), &mut headers),
            vec![HeaderName::from_static("authorization")]
        );
        assert_eq!(headers["authorization"], "Bearer e");

        let mut headers = http::HeaderMap::new();
        assert!(
            credentials
                .apply("other", &to("erp.example.com", 443), &mut headers)
                .is_empty()
        );
        assert!(
            credentials
                .apply("order-sync", &to("erp.example.com", 8443), &mut headers)
                .is_empty()
        );
        assert!(
            credentials
                .apply("order-sync", &to("evil.example.com", 443), &mut headers)
                .is_empty()
        );
        assert!(headers.is_empty());

        credentials.apply("any", &to("eu.crm.example.com", 443), &mut headers);
        assert_eq!(headers["x-api-key"], "k");
    }

    #[test]
    fn the_host_credential_replaces_what_the_guest_set_and_the_first_entry_wins() {
        let credentials = Credentials::new(vec![
            credential(
                "https://erp.example.com",
                "authorization",
                "Bearer first",
                None,
            ),
            credential(
                "https://erp.example.com",
                "authorization",
                "Bearer second",
                None,
            ),
        ]);
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer guest"));
        credentials.apply("h", &to("erp.example.com", 443), &mut headers);
        assert_eq!(headers.get_all("authorization").iter().count(), 1);
        assert_eq!(headers["authorization"], "Bearer first");
    }

    #[test]
    fn a_credential_value_is_not_printed() {
        let credentials = Credentials::new(vec![credential(
            "https://erp.example.com",
            "authorization",
            "Bearer s3cret",
            None,
        )]);
        let mut headers = http::HeaderMap::new();
        credentials.apply("h", &to("erp.example.com", 443), &mut headers);
        assert!(!format!("{credentials:?}").contains("s3cret"));
        assert!(!format!("{headers:?}").contains("s3cret"));
    }
}
