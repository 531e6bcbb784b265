//! `hookmesh deploy` and `hookmesh handlers …`: the real binary against a
//! real nats-server, with real components built from `handlers/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use hookmesh::audit::{Action, AuditRecord};
use hookmesh::deploy::{self, Change, Deployed, HandlerStore, HistoryEntry};
use hookmesh::streams::{self, Mode};
use hookmesh_test_support::NatsServer;

use crate::support::*;

/// A test bed: a server with the streams applied, a config file naming it,
/// and a scratch directory.
pub(crate) struct Bed {
    pub(crate) nats: NatsServer,
    pub(crate) js: jetstream::Context,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
}

impl Bed {
    pub(crate) async fn new() -> Bed {
        let nats = NatsServer::start().expect("nats");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("hookmesh.toml");
        std::fs::write(&config, config_toml(&nats.url(), &Options::default())).expect("config");
        let bed = Bed {
            js: jetstream(&nats).await,
            nats,
            dir,
            config,
        };
        let out = bed.cli(&["streams", "apply"]);
        assert!(out.status.success(), "streams apply: {}", stderr(&out));
        bed
    }

    /// Runs `hookmesh --config <bed config> <args>`.
    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        Command::new(hookmesh_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(self.dir.path())
            .env("HOOKMESH_LOG", "warn")
            .env_remove("HOOKMESH_CONFIG")
            .output()
            .expect("run hookmesh")
    }

    /// Runs the CLI and expects success; its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "hookmesh {args:?} failed: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Runs the CLI and expects failure; its stderr.
    pub(crate) fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "hookmesh {args:?} succeeded: {}",
            stdout(&out)
        );
        stderr(&out)
    }

    pub(crate) fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path.display().to_string()
    }

    pub(crate) async fn store(&self) -> HandlerStore {
        HandlerStore::open(&self.js).await.expect("store opens")
    }

    /// Every record on `HOOK_AUDIT`, with its subject, in order.
    pub(crate) async fn audit(&self) -> Vec<(String, AuditRecord)> {
        let stream = self.js.get_stream("HOOK_AUDIT").await.expect("HOOK_AUDIT");
        let state = stream.get_info().await.expect("info").state;
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let message = stream.get_raw_message(seq).await.expect("audit message");
            let record: AuditRecord =
                serde_json::from_slice(&message.payload).expect("an audit record");
            out.push((message.subject.to_string(), record));
        }
        out
    }

    /// Messages in a stream.
    pub(crate) async fn messages(&self, stream: &str) -> u64 {
        self.js
            .get_stream(stream)
            .await
            .expect("stream")
            .get_info()
            .await
            .expect("info")
            .state
            .messages
    }

    /// The KV revision of a handler's key (deletes included).
    pub(crate) async fn revision(&self, name: &str) -> Option<u64> {
        let kv = self
            .js
            .get_key_value("hook_handlers")
            .await
            .expect("bucket");
        kv.entry(name).await.expect("entry").map(|e| e.revision)
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

fn sha256_of(path: &Path) -> String {
    deploy::sha256_hex(&std::fs::read(path).expect("component"))
}

fn order_sync_manifest() -> String {
    path_str(&workspace().join("handlers/order-sync/handler.toml"))
}

#[tokio::test]
async fn deploy_stores_the_component_and_the_manifest_and_audits_it() {
    let bed = Bed::new().await;
    let wasm = guest("order_sync");
    let digest = sha256_of(&wasm);
    let label = format!("1-{}", &digest[..12]);

    let out = bed.ok(&[
        "deploy",
        &path_str(&wasm),
        "--manifest",
        &order_sync_manifest(),
        "--actor",
        "alice",
    ]);
    assert!(
        out.starts_with(&format!(
            "deployed order-sync version {label} (sha256 {digest}"
        )),
        "{out}"
    );
    assert!(out.contains("uploaded"), "{out}");

    let store = bed.store().await;
    let current = store
        .current("order-sync")
        .await
        .expect("read")
        .expect("deployed");
    assert_eq!(current.version, label);
    assert_eq!(current.counter, 1);
    assert_eq!(current.digest, digest);
    assert_eq!(current.size, std::fs::metadata(&wasm).expect("size").len());
    assert_eq!(current.deployed_by, "alice");
    assert_eq!(current.rolled_back_from, None);
    assert_eq!(current.manifest.digest.as_deref(), Some(digest.as_str()));
    assert_eq!(current.manifest.component, None);
    assert_eq!(current.manifest.subject, "crm.order.>");
    assert_eq!(current.manifest.config["erp_url"], "http://127.0.0.1:8090");
    assert_eq!(current.manifest.allowed_hosts, ["http://127.0.0.1:8090"]);
    assert!(humantime::parse_rfc3339(&current.deployed_at).is_ok());
    // The object is stored under its sha256 and comes back intact.
    assert_eq!(
        store.fetch_component(&digest).await.expect("fetch"),
        std::fs::read(&wasm).expect("read")
    );
    let audit = bed.audit().await;
    assert_eq!(audit.len(), 1);
    let (subject, record) = &audit[0];
    assert_eq!(subject, "audit.deploy.order-sync");
    assert_eq!(record.action, Action::Deploy);
    assert_eq!(
        (
            record.actor.as_str(),
            record.handler.as_str(),
            record.outcome.as_str()
        ),
        ("alice", "order-sync", "ok")
    );
    assert_eq!(record.version.as_deref(), Some(label.as_str()));
    assert_eq!(record.previous_version, None);

    // The same component and manifest again: nothing changes.
    let revision = bed.revision("order-sync").await;
    let objects = bed.messages("OBJ_hook_handlers").await;
    let out = bed.ok(&[
        "deploy",
        &path_str(&wasm),
        "--manifest",
        &order_sync_manifest(),
    ]);
    assert!(
        out.starts_with(&format!(
            "nothing changed: order-sync version {label} already runs this component"
        )),
        "{out}"
    );
    assert_eq!(
        bed.revision("order-sync").await,
        revision,
        "no new KV revision"
    );
    assert_eq!(
        bed.messages("OBJ_hook_handlers").await,
        objects,
        "no upload"
    );
    let audit = bed.audit().await;
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[1].1.outcome, "unchanged");

    // The same component under a different manifest (from flags): a new
    // version, without a second upload.
    let out = bed.ok(&[
        "deploy",
        &path_str(&wasm),
        "--name",
        "order-sync",
        "--subject",
        "crm.order.>",
        "--timeout",
        "2s",
        "--max-deliver",
        "3",
        "--set",
        "erp_url=https://erp.example.com",
        "--allow-host",
        "https://erp.example.com",
        "--on-dead-letter",
        "park",
    ]);
    let label2 = format!("2-{}", &digest[..12]);
    assert!(
        out.starts_with(&format!("deployed order-sync version {label2}"))
            && out.contains("component already stored")
            && out.contains(&format!("replacing {label}")),
        "{out}"
    );
    assert_eq!(
        bed.messages("OBJ_hook_handlers").await,
        objects,
        "no upload"
    );
    let current = store
        .current("order-sync")
        .await
        .expect("read")
        .expect("deployed");
    assert_eq!((current.counter, current.manifest.max_deliver), (2, 3));
    assert_eq!(current.manifest.timeout, Duration::from_secs(2));
    assert_eq!(
        current.manifest.on_dead_letter,
        hookmesh::manifest::OnDeadLetter::Park
    );
    assert_eq!(current.manifest.allowed_hosts, ["https://erp.example.com"]);
    let last = bed.audit().await.pop().expect("a record").1;
    assert_eq!(last.version.as_deref(), Some(label2.as_str()));
    assert_eq!(last.previous_version.as_deref(), Some(label.as_str()));
}

#[tokio::test]
async fn what_is_not_a_handler_component_is_refused_and_nothing_is_uploaded() {
    let bed = Bed::new().await;
    let flags = ["--name", "bad", "--subject", "crm.order.>"];
    let text = bed.file("handler.txt", b"this is not wasm\n");
    let core = bed.file(
        "core.wasm",
        // The smallest core module: the header alone.
        b"\0asm\x01\0\0\0",
    );
    let empty_component = bed.file("empty.wasm", b"\0asm\x0d\0\x01\0");
    let trap = path_str(&guest("fixture_trap_at_start"));
    let cases = [
        (
            text.as_str(),
            "not a WebAssembly component: it is text, not a binary WebAssembly file",
        ),
        (
            core.as_str(),
            "a core WebAssembly module, not a component: build the handler for wasm32-wasip2",
        ),
        (
            empty_component.as_str(),
            "the component does not implement hookmesh:handler/handler: it does not export `handle`",
        ),
        (
            trap.as_str(),
            "the component fails while starting (it would be refused by every host): wasm trap",
        ),
    ];
    for (file, expected) in cases {
        let mut args = vec!["deploy", file];
        args.extend(flags);
        let err = bed.fails(&args);
        assert!(
            err.contains(&format!("error: {file} refused: {expected}")),
            "{file}: {err}"
        );
    }
    let missing = bed.fails(&[
        "deploy",
        "/nonexistent.wasm",
        "--name",
        "bad",
        "--subject",
        "crm.>",
    ]);
    assert!(
        missing.contains("cannot read /nonexistent.wasm"),
        "{missing}"
    );
    let bad_manifest = bed.fails(&["deploy", &trap, "--name", "Bad Name", "--subject", "crm.>"]);
    assert!(
        bad_manifest.contains("name: use 1–64 characters of [a-z0-9_-], not \"Bad Name\""),
        "{bad_manifest}"
    );
    let no_manifest = bed.fails(&["deploy", &trap]);
    assert!(
        no_manifest.contains("give --manifest FILE, or at least --name and --subject"),
        "{no_manifest}"
    );

    assert_eq!(
        bed.messages("OBJ_hook_handlers").await,
        0,
        "nothing uploaded"
    );
    assert_eq!(bed.messages("KV_hook_handlers").await, 0, "nothing written");
    assert_eq!(bed.messages("HOOK_AUDIT").await, 0);
    assert_eq!(bed.ok(&["handlers", "list"]).trim(), "no handlers deployed");
}

#[tokio::test]
async fn without_nats_the_cli_says_so() {
    let bed = Bed::new().await;
    let wasm = path_str(&guest("fixture_noop"));
    let port = bed.nats.port();
    drop(bed.nats);
    for args in [
        vec![
            "deploy",
            wasm.as_str(),
            "--name",
            "noop",
            "--subject",
            "crm.>",
        ],
        vec!["handlers", "list"],
    ] {
        let out = Command::new(hookmesh_bin())
            .arg("--config")
            .arg(&bed.config)
            .args(&args)
            .env("HOOKMESH_LOG", "off")
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains(&format!(
                "cannot connect to NATS at nats://127.0.0.1:{port}"
            )),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// Creates `handler_<name>_<p>` for partitions 0 and 1 with the filters a
/// host would use.
async fn consumers(js: &jetstream::Context, name: &str) {
    let stream = events(js).await;
    for partition in 0..2 {
        stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("handler_{name}_{partition}")),
                filter_subject: format!("hook.crm.order.{partition}.>"),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 1,
                ..Default::default()
            })
            .await
            .expect("consumer");
    }
}

async fn publish(js: &jetstream::Context, subject: &str) {
    js.publish(subject.to_string(), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
}

/// The cells of the `handlers list` row of `name`.
fn row(list: &str, name: &str) -> Option<Vec<String>> {
    list.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(name))
}

#[tokio::test]
async fn list_show_rollback_and_remove() {
    let bed = Bed::new().await;
    let noop = guest("fixture_noop");
    let permanent = guest("fixture_permanent");
    let (noop_digest, permanent_digest) = (sha256_of(&noop), sha256_of(&permanent));
    let deploy = |wasm: &Path, name: &str| {
        bed.ok(&[
            "deploy",
            &path_str(wasm),
            "--name",
            name,
            "--subject",
            "crm.order.>",
            "--actor",
            "carol",
        ])
    };
    deploy(&noop, "first");
    deploy(&permanent, "first");
    deploy(&noop, "second");
    let v1 = format!("1-{}", &noop_digest[..12]);
    let v2 = format!("2-{}", &permanent_digest[..12]);

    // A backlog: 2 events on partition 0 (one of them delivered and not
    // acked), 1 on partition 1; one dead letter.
    consumers(&bed.js, "first").await;
    publish(&bed.js, "hook.crm.order.0.ORD-1.order.created").await;
    publish(&bed.js, "hook.crm.order.0.ORD-1.order.updated").await;
    publish(&bed.js, "hook.crm.order.1.ORD-2.order.created").await;
    publish(&bed.js, "dlq.first.crm.order.0.ORD-9.order.created").await;
    let consumer: jetstream::consumer::PullConsumer = events(&bed.js)
        .await
        .get_consumer("handler_first_0")
        .await
        .expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let _unacked = batch.next().await.expect("a message").expect("ok");

    let list = bed.ok(&["handlers", "list"]);
    let header = list.lines().next().expect("a header");
    assert!(
        header.starts_with("NAME") && header.contains("PENDING") && header.contains("DEAD LETTERS"),
        "{list}"
    );
    let first = row(&list, "first").expect("first listed");
    assert_eq!(first[1], v2, "{list}");
    assert_eq!(first[2], permanent_digest[..12], "{list}");
    assert_eq!(first[4], "crm.order.>", "{list}");
    assert_eq!(
        &first[5..],
        ["2", "1", "1"],
        "pending, ack pending, dead letters: {list}"
    );
    let second = row(&list, "second").expect("second listed");
    assert_eq!(&second[5..], ["0", "0", "0"], "{list}");

    let show = bed.ok(&["handlers", "show", "first"]);
    assert!(show.contains(&format!("version:     {v2}")), "{show}");
    assert!(show.contains("subject = \"crm.order.>\""), "{show}");
    assert!(
        show.contains(&format!("digest = \"{permanent_digest}\"")),
        "{show}"
    );
    let newest = show
        .find(&format!("\n2         {v2}"))
        .expect("v2 in history");
    let oldest = show
        .find(&format!("\n1         {v1}"))
        .expect("v1 in history");
    assert!(newest < oldest, "newest first: {show}");

    // Default: back to the previous distinct version, as a new version.
    let out = bed.ok(&["handlers", "rollback", "first", "--actor", "dave"]);
    let v3 = format!("3-{}", &noop_digest[..12]);
    assert!(
        out.starts_with(&format!("rolled back first to version {v3}")),
        "{out}"
    );
    let store = bed.store().await;
    let current = store.current("first").await.expect("read").expect("active");
    assert_eq!(
        (current.digest.as_str(), current.rolled_back_from.as_deref()),
        (noop_digest.as_str(), Some(v2.as_str()))
    );
    let (subject, record) = bed.audit().await.pop().expect("audit");
    assert_eq!(subject, "audit.rollback.first");
    assert_eq!(
        (
            record.action,
            record.actor.as_str(),
            record.outcome.as_str()
        ),
        (Action::Rollback, "dave", "ok")
    );
    assert_eq!(record.version.as_deref(), Some(v3.as_str()));
    assert_eq!(record.previous_version.as_deref(), Some(v2.as_str()));

    // --to a version label.
    let out = bed.ok(&["handlers", "rollback", "first", "--to", &v2]);
    assert!(out.starts_with("rolled back first to version 4-"), "{out}");
    let current = store.current("first").await.expect("read").expect("active");
    assert_eq!(current.digest, permanent_digest);
    assert_eq!(current.counter, 4);

    let err = bed.fails(&["handlers", "rollback", "first", "--to", "99-abc"]);
    assert!(
        err.contains("handler \"first\" has no version \"99-abc\" (known: 4-"),
        "{err}"
    );
    let err = bed.fails(&["handlers", "rollback", "nobody"]);
    assert!(
        err.contains("unknown handler \"nobody\" (known: first, second)"),
        "{err}"
    );
    let err = bed.fails(&["handlers", "show", "nobody"]);
    assert!(err.contains("unknown handler \"nobody\""), "{err}");

    // Remove keeps the consumers unless asked.
    let out = bed.ok(&["handlers", "remove", "first"]);
    assert!(out.starts_with("removed first (was version 4-"), "{out}");
    assert_eq!(store.current("first").await.expect("read"), None);
    assert!(row(&bed.ok(&["handlers", "list"]), "first").is_none());
    let stream = events(&bed.js).await;
    for partition in 0..2 {
        stream
            .consumer_info(format!("handler_first_{partition}"))
            .await
            .expect("consumer kept");
    }
    let (subject, record) = bed.audit().await.pop().expect("audit");
    assert_eq!(subject, "audit.remove.first");
    assert_eq!(record.version.as_deref(), Some(current.version.as_str()));
    let history = store.history("first").await.expect("history");
    assert!(matches!(history.last(), Some(HistoryEntry::Removed { .. })));
    let show = bed.ok(&["handlers", "show", "first"]);
    assert!(
        show.contains("first (removed)") && show.contains("removed"),
        "{show}"
    );
    let err = bed.fails(&["handlers", "remove", "first"]);
    assert!(err.contains("unknown handler \"first\""), "{err}");

    // A removed handler comes back with a rollback (its last version).
    let out = bed.ok(&["handlers", "rollback", "first"]);
    assert!(out.starts_with("rolled back first to version 5-"), "{out}");
    assert_eq!(
        store
            .current("first")
            .await
            .expect("read")
            .expect("back")
            .digest,
        permanent_digest
    );

    // --delete-consumer deletes every partition consumer of that handler
    // and no other.
    consumers(&bed.js, "second").await;
    let out = bed.ok(&["handlers", "remove", "second", "--delete-consumer"]);
    assert!(
        out.contains("deleted consumers: handler_second_0, handler_second_1"),
        "{out}"
    );
    for partition in 0..2 {
        assert!(
            stream
                .consumer_info(format!("handler_second_{partition}"))
                .await
                .is_err(),
            "handler_second_{partition} deleted"
        );
        stream
            .consumer_info(format!("handler_first_{partition}"))
            .await
            .expect("the other handler's consumers stay");
    }
    let (_, record) = bed.audit().await.pop().expect("audit");
    assert_eq!(
        (record.action, record.outcome.as_str()),
        (Action::Remove, "ok, consumers deleted")
    );
}

#[tokio::test]
async fn the_library_watch_starts_with_the_current_state_then_follows() {
    let bed = Bed::new().await;
    let store = bed.store().await;
    let noop = validated("fixture_noop");
    let manifest = |name: &str| manifest(name, "fixture_noop", "crm.order.>");
    for name in ["alpha", "beta"] {
        let deployed = store
            .deploy(manifest(name), &noop, "test")
            .await
            .expect("deploy");
        assert!(
            matches!(deployed, Deployed::Activated { .. }),
            "{deployed:?}"
        );
    }
    store.remove("beta", false, "test").await.expect("remove");

    let mut watch = store.watch().await.expect("watch");
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a change in time")
            .expect("the watch goes on")
            .expect("a valid change")
    };
    match next().await {
        Change::Deployed(d) => assert_eq!((d.name(), d.counter), ("alpha", 1)),
        other => panic!("alpha's deployment first, not {other:?}"),
    }
    assert_eq!(
        next().await,
        Change::Removed {
            name: "beta".into()
        }
    );
    store
        .deploy(manifest("gamma"), &noop, "test")
        .await
        .expect("deploy");
    match next().await {
        Change::Deployed(d) => {
            assert_eq!(d.name(), "gamma");
            assert_eq!(
                store.fetch_component(&d.digest).await.expect("fetch"),
                noop.bytes()
            );
        }
        other => panic!("gamma's deployment, not {other:?}"),
    }
    // The same again is reported unchanged and does not reach the watch.
    let again = store
        .deploy(manifest("gamma"), &noop, "test")
        .await
        .expect("deploy");
    assert!(matches!(again, Deployed::Unchanged(_)), "{again:?}");
    store
        .rollback("beta", None, "test")
        .await
        .expect("beta back");
    match next().await {
        Change::Deployed(d) => assert_eq!((d.name(), d.counter), ("beta", 2)),
        other => panic!("beta's comeback, not {other:?}"),
    }
}

#[tokio::test]
async fn the_object_store_definition_matches_the_clients_own() {
    // A store made by the client first is taken over by `streams apply`,
    // and one made by `streams apply` works with the client's API.
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    js.create_object_store(jetstream::object_store::Config {
        bucket: "hook_handlers".into(),
        ..Default::default()
    })
    .await
    .expect("create_object_store");
    let ingest = hookmesh::config::Config::from_toml(
        &config_toml(&nats.url(), &Options::default()),
        hookmesh::config::Origin::Builtin,
        &hookmesh::config::Env::default(),
    )
    .expect("config")
    .ingest;
    for _ in 0..2 {
        streams::apply(&js, &ingest, Mode::Update)
            .await
            .expect("apply");
    }
    let info = js
        .get_stream("OBJ_hook_handlers")
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info");
    assert_eq!(
        info.config.subjects,
        vec!["$O.hook_handlers.C.>", "$O.hook_handlers.M.>"]
    );
    let objects = js.get_object_store("hook_handlers").await.expect("store");
    let mut body: &[u8] = b"bytes";
    objects.put("x", &mut body).await.expect("put");
    let kv = js.get_key_value("hook_handlers").await.expect("bucket");
    assert_eq!(kv.status().await.expect("status").history(), 64);
}

#[tokio::test]
async fn concurrent_deploys_of_one_handler_each_get_their_own_version() {
    let bed = Bed::new().await;
    let store = bed.store().await;
    let components: Vec<_> = ["fixture_noop", "fixture_permanent", "fixture_flaky"]
        .iter()
        .map(|c| validated(c))
        .collect();
    let deploys = components.iter().map(|component| {
        let store = store.clone();
        async move {
            store
                .deploy(manifest("racy", "fixture_noop", "crm.>"), component, "test")
                .await
        }
    });
    let results = futures::future::join_all(deploys).await;
    let mut counters: Vec<u64> = results
        .into_iter()
        .map(|r| match r.expect("each deploy succeeds") {
            Deployed::Activated { deployment, .. } => deployment.counter,
            Deployed::Unchanged(d) => panic!("{d:?} reported unchanged"),
        })
        .collect();
    counters.sort();
    assert_eq!(counters, [1, 2, 3]);
    let history = store.history("racy").await.expect("history");
    assert_eq!(history.len(), 3);
}
