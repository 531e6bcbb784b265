//! `[nats]`: how every hookmesh process reaches NATS — server URLs,
//! one authentication method, TLS, and the replication factor of the
//! streams it creates.
//!
//! ```toml
//! [nats]
//! url = ["nats://n1:4222", "nats://n2:4222", "nats://n3:4222"]
//! # one of: creds, nkey_seed, token, user + password
//! creds = "/etc/hookmesh/worker.creds"   # a path, file:PATH, or env:VAR holding the file's text
//! # nkey_seed = "env:NATS_NKEY_SEED"     # a user seed (SU…)
//! # token = "file:/run/secrets/nats-token"
//! # user = "ingress"
//! # password = "env:NATS_PASSWORD"
//! tls_ca = "/etc/hookmesh/nats-ca.pem"
//! tls_cert = "/etc/hookmesh/client.pem"  # mutual TLS, with tls_key
//! tls_key = "/etc/hookmesh/client-key.pem"
//! tls_required = true
//! tls_first = false                      # TLS before the server's INFO (nats-server ≥ 2.10.4, `handshake_first`)
//! replicas = 3                           # R3 streams, buckets and the object store on a 3-node cluster
//! ```
//!
//! Every secret (`password`, `token`, `nkey_seed`, `creds` as `env:`) is
//! resolved at load and kept [`Redacted`]; the key files stay paths the
//! client reads when it connects.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Env, KeyError, Lenient, OneOrMany, Redacted, env_name, resolve_secret};

/// The most replicas a JetStream stream can have.
pub const MAX_REPLICAS: usize = 5;

/// How to reach NATS.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs; the client picks any and fails over between them.
    pub urls: Vec<String>,
    /// How the client proves who it is (at most one method).
    pub auth: NatsAuth,
    /// A CA certificate (PEM) to trust for TLS.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for mutual TLS; needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
    /// Start TLS before the server's INFO, for servers configured with
    /// `handshake_first` (nats-server 2.10.4 and later); implies TLS.
    pub tls_first: bool,
    /// The replication factor of every stream, bucket and object store
    /// hookmesh creates (1 on a single server, 3 on a 3-node cluster).
    pub replicas: usize,
}

/// One way of authenticating to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (a development server).
    None,
    /// User name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password (a resolved secret).
        password: Redacted,
    },
    /// A token (a resolved secret).
    Token(Redacted),
    /// An NKey user seed (`SU…`, a resolved secret): the server knows the
    /// public key only.
    NkeySeed(Redacted),
    /// A `.creds` file (user JWT + seed, for servers in operator mode).
    Creds(Creds),
}

/// Where a `.creds` file's text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creds {
    /// A file, read when connecting.
    File(PathBuf),
    /// The text itself (from `env:VAR`).
    Text(Redacted),
}

impl NatsConfig {
    /// The user name, when authenticating with user and password.
    pub fn user(&self) -> Option<&str> {
        match &self.auth {
            NatsAuth::UserPassword { user, .. } => Some(user),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNats {
    url: OneOrMany,
    #[serde(alias = "creds_file")]
    creds: Option<String>,
    nkey_seed: Option<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_required: Lenient<bool>,
    tls_first: Lenient<bool>,
    replicas: Lenient<usize>,
}

impl Default for RawNats {
    fn default() -> Self {
        RawNats {
            url: OneOrMany(vec!["nats://127.0.0.1:4222".into()]),
            creds: None,
            nkey_seed: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: Lenient(false),
            tls_first: Lenient(false),
            replicas: Lenient(1),
        }
    }
}

impl RawNats {
    pub(super) fn resolve(self, env: &Env) -> Result<NatsConfig, KeyError> {
        // `HOOKMESH_NATS_URL=nats://a:4222,nats://b:4222` is a list too.
        let urls: Vec<String> = (self.url.0.iter())
            .flat_map(|u| u.split(','))
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(("nats.url".into(), "at least one URL is needed".into()));
        }
        for url in &urls {
            url.parse::<async_nats::ServerAddr>().map_err(|e| {
                (
                    "nats.url".to_string(),
                    format!("{url:?} is not a NATS URL: {e}"),
                )
            })?;
        }
        if self.password.is_some() != self.user.is_some() {
            return Err(("nats.user".into(), "user and password go together".into()));
        }
        let methods: Vec<&str> = [
            ("creds", self.creds.is_some()),
            ("nkey_seed", self.nkey_seed.is_some()),
            ("token", self.token.is_some()),
            ("user", self.user.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| *k)
        .collect();
        if let [first, second, ..] = methods.as_slice() {
            return Err((
                format!("nats.{second}"),
                format!(
                    "one authentication method only: {first} is set already \
                     (creds, nkey_seed, token and user/password exclude each other)"
                ),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err((
                "nats.tls_cert".into(),
                "tls_cert and tls_key go together".into(),
            ));
        }
        let files = [
            ("nats.tls_ca", &self.tls_ca),
            ("nats.tls_cert", &self.tls_cert),
            ("nats.tls_key", &self.tls_key),
        ];
        for (key, file) in files {
            if let Some(path) = file.as_ref() {
                readable(key, path)?;
            }
        }
        let replicas = self.replicas.0;
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err((
                "nats.replicas".into(),
                format!("must be between 1 and {MAX_REPLICAS} (3 on a 3-node cluster)"),
            ));
        }
        let secret = |key: &str, reference: String| -> Result<Redacted, KeyError> {
            match resolve_secret(&reference, env) {
                Ok(Some(v)) => Ok(Redacted(v)),
                Ok(None) => Err((key.into(), format!("{} is not set", env_name(&reference)))),
                Err(message) => Err((key.into(), message)),
            }
        };
        let auth = if let Some(reference) = self.creds {
            NatsAuth::Creds(creds(reference, &secret)?)
        } else if let Some(reference) = self.nkey_seed {
            let seed = secret("nats.nkey_seed", reference)?;
            check_user_seed(&seed.0).map_err(|m| ("nats.nkey_seed".to_string(), m))?;
            NatsAuth::NkeySeed(seed)
        } else if let Some(reference) = self.token {
            NatsAuth::Token(secret("nats.token", reference)?)
        } else if let (Some(user), Some(password)) = (self.user, self.password) {
            NatsAuth::UserPassword {
                user,
                password: secret("nats.password", password)?,
            }
        } else {
            NatsAuth::None
        };
        Ok(NatsConfig {
            urls,
            auth,
            tls_ca: self.tls_ca,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_required: self.tls_required.0 || self.tls_first.0,
            tls_first: self.tls_first.0,
            replicas,
        })
    }
}

/// `creds`: a plain path or `file:PATH` is read when connecting (after a
/// check that it is there); `env:VAR` holds the text itself.
fn creds(
    reference: String,
    secret: &dyn Fn(&str, String) -> Result<Redacted, KeyError>,
) -> Result<Creds, KeyError> {
    let key = "nats.creds";
    if reference.starts_with("env:") {
        let text = secret(key, reference)?;
        if !text.0.contains("NATS USER JWT") {
            return Err((
                key.into(),
                "the variable does not hold a .creds file (no NATS USER JWT block)".into(),
            ));
        }
        return Ok(Creds::Text(text));
    }
    let path = PathBuf::from(reference.strip_prefix("file:").unwrap_or(&reference));
    readable(key, &path)?;
    Ok(Creds::File(path))
}

fn readable(key: &str, path: &std::path::Path) -> Result<(), KeyError> {
    if path.is_file() {
        Ok(())
    } else {
        Err((
            key.into(),
            format!("{} is not a readable file", path.display()),
        ))
    }
}

/// A user seed is `SU` + base32; anything else (an account seed, a public
/// key pasted by mistake) is refused at load instead of at connect.
fn check_user_seed(seed: &str) -> Result<(), String> {
    let seed = seed.trim();
    if !seed.starts_with("SU") {
        return Err("not an NKey user seed (it starts with \"SU\")".into());
    }
    nkeys::KeyPair::from_seed(seed)
        .map(drop)
        .map_err(|e| format!("not a valid NKey user seed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<NatsConfig, KeyError> {
        let raw: RawNats = toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        raw.resolve(&Env::from_pairs(env.iter().copied()))
    }

    #[test]
    fn defaults_to_one_local_server_without_credentials() {
        let config = load("", &[]).expect("defaults");
        assert_eq!(config.urls, ["nats://127.0.0.1:4222"]);
        assert_eq!(config.auth, NatsAuth::None);
        assert_eq!(config.replicas, 1);
        assert!(!config.tls_required && !config.tls_first);
    }

    #[test]
    fn a_user_seed_resolves_from_the_environment_and_stays_redacted() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().expect("seed");
        let config =
            load("nkey_seed = \"env:SEED\"", &[("SEED", seed.as_str())]).expect("seed loads");
        assert_eq!(config.auth, NatsAuth::NkeySeed(Redacted(seed.clone())));
        assert!(!format!("{config:?}").contains(&seed));

        let account = nkeys::KeyPair::new_account().seed().expect("seed");
        let (key, message) = load(&format!("nkey_seed = {account:?}"), &[]).expect_err("refused");
        assert_eq!(key, "nats.nkey_seed");
        assert!(message.contains("user seed"), "{message}");
    }

    #[test]
    fn creds_come_from_a_path_or_from_a_variable_holding_the_text() {
        let path = std::env::temp_dir().join(format!("hookmesh-{}.creds", std::process::id()));
        std::fs::write(&path, "creds").expect("write");
        let config = load(&format!("creds = \"file:{}\"", path.display()), &[]).expect("loads");
        assert_eq!(config.auth, NatsAuth::Creds(Creds::File(path.clone())));
        let config = load(
            &format!("creds_file = {:?}", path.display().to_string()),
            &[],
        )
        .expect("the older key still loads");
        assert_eq!(config.auth, NatsAuth::Creds(Creds::File(path.clone())));
        let _ = std::fs::remove_file(&path);

        let text = "-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n";
        let config = load("creds = \"env:CREDS\"", &[("CREDS", text)]).expect("loads");
        assert_eq!(
            config.auth,
            NatsAuth::Creds(Creds::Text(Redacted(text.into())))
        );
        let (key, _) = load("creds = \"env:CREDS\"", &[("CREDS", "nope")]).expect_err("refused");
        assert_eq!(key, "nats.creds");
    }

    #[test]
    fn authentication_methods_exclude_each_other() {
        let (key, message) = load(
            "token = \"t0ken-value\"\nuser = \"u\"\npassword = \"p\"",
            &[],
        )
        .expect_err("two methods");
        assert_eq!(key, "nats.user");
        assert!(message.contains("token is set already"), "{message}");
    }

    #[test]
    fn tls_first_implies_tls_and_replicas_are_bounded() {
        let config = load("tls_first = true\nreplicas = \"3\"", &[]).expect("loads");
        assert!(config.tls_first && config.tls_required);
        assert_eq!(config.replicas, 3);
        let (key, _) = load("replicas = 0", &[]).expect_err("refused");
        assert_eq!(key, "nats.replicas");
        let (key, _) = load("replicas = 7", &[]).expect_err("refused");
        assert_eq!(key, "nats.replicas");
    }
}
