//! A partition owner's pull requests, all answered on one inbox
//! subscription that lives as long as the owner works the partition.
//!
//! A pull request per inbox (async-nats' `batch()`) costs the server a
//! subscription and an unsubscription for every request, and a delivery
//! that arrives after the client gave up on its request is dropped with
//! the subscription — a delivery astray, left for `ack_wait` to bring
//! back. Here each request gets a reply subject of its own under the
//! owner's wildcard inbox: the server's answers about a request (408 when
//! it expires, 409 when it is cut) name the request they end, so one that
//! comes late cannot end a newer request; and deliveries, whichever
//! request they answer, all reach the owner.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{StatusCode, Subject, Subscriber};
use futures::StreamExt;
use serde::Serialize;
use tokio::time::{Instant, Sleep};

/// How long past its expiry a request may stay unanswered before the owner
/// takes it as forgotten by the server (its consumer leader went away).
const FORGOTTEN_AFTER: Duration = Duration::from_secs(5);

/// What the next answer on the inbox was.
// Not boxed: nearly every answer is a delivery, moved on at once; a box
// would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Pulled {
    /// A delivery (of the open request, or of one that ended before).
    Message(jetstream::Message),
    /// The open request is over: filled, or expired on the server.
    Ended,
    /// The open request had no answer [`FORGOTTEN_AFTER`] past its expiry:
    /// the server no longer knows it, and what it delivered may be astray.
    Forgotten,
    /// The server ended the open request with an error (a 409 such as a
    /// consumer leadership change, or no JetStream answering).
    Failed(String),
}

/// The body of a pull request (`$JS.API.CONSUMER.MSG.NEXT`).
#[derive(Serialize)]
struct Next {
    batch: usize,
    /// Nanoseconds.
    expires: u64,
}

/// The request being answered.
#[derive(Debug)]
struct Open {
    /// Its number: the last token of its reply subject.
    number: u64,
    /// Deliveries still to come before it is filled.
    left: usize,
}

/// The pull requests of one consumer, one open at a time.
pub(super) struct Puller {
    client: async_nats::Client,
    context: jetstream::Context,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    next_subject: Subject,
    /// The owner's inbox; request `n` is answered on `<inbox>.<n>`.
    inbox: String,
    answers: Subscriber,
    open: Option<Open>,
    /// The last delivery filled the open request: the next call says so.
    filled: bool,
    numbered: u64,
    /// [`FORGOTTEN_AFTER`], shorter in tests.
    forgotten_after: Duration,
    /// When the open request counts as forgotten: one timer for the
    /// owner's life, set again by each request (not one per answer).
    forgotten: Pin<Box<Sleep>>,
    /// The subscription ended (the client closed): said once, then
    /// nothing more comes.
    ended: bool,
}

impl Puller {
    /// Subscribes the inbox for `consumer` of `stream`.
    pub(super) async fn new(
        context: &jetstream::Context,
        stream: &str,
        consumer: &str,
    ) -> Result<Puller, async_nats::SubscribeError> {
        let client = context.client();
        let inbox = client.new_inbox();
        let answers = client.subscribe(format!("{inbox}.*")).await?;
        Ok(Puller {
            client,
            context: context.clone(),
            next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}").into(),
            inbox,
            answers,
            open: None,
            filled: false,
            numbered: 0,
            forgotten_after: FORGOTTEN_AFTER,
            forgotten: Box::pin(tokio::time::sleep(FORGOTTEN_AFTER)),
            ended: false,
        })
    }

    /// Whether a request is open (or its end not yet told).
    pub(super) fn is_open(&self) -> bool {
        self.open.is_some() || self.filled
    }

    /// Asks for up to `batch` events, waiting `expires` on the server for
    /// them. A request still open is given up (its answers are ignored,
    /// its deliveries still arrive).
    pub(super) async fn request(
        &mut self,
        batch: usize,
        expires: Duration,
    ) -> Result<(), async_nats::Error> {
        self.numbered += 1;
        let number = self.numbered;
        let body = serde_json::to_vec(&Next {
            batch,
            expires: u64::try_from(expires.as_nanos()).unwrap_or(u64::MAX),
        })?;
        self.client
            .publish_with_reply(
                self.next_subject.clone(),
                format!("{}.{number}", self.inbox),
                body.into(),
            )
            .await?;
        self.open = Some(Open {
            number,
            left: batch,
        });
        self.forgotten
            .as_mut()
            .reset(Instant::now() + expires + self.forgotten_after);
        self.filled = false;
        Ok(())
    }

    /// The next answer. Pending forever while no request is open and no
    /// delivery arrives.
    pub(super) async fn next(&mut self) -> Pulled {
        if std::mem::take(&mut self.filled) {
            return Pulled::Ended;
        }
        if self.ended {
            // Not the same failure again and again to a loop that polls.
            return std::future::pending().await;
        }
        loop {
            let answer = if self.open.is_some() {
                let answered = tokio::select! {
                    biased;
                    answer = self.answers.next() => Some(answer),
                    () = self.forgotten.as_mut() => None,
                };
                let Some(answer) = answered else {
                    self.open = None;
                    return Pulled::Forgotten;
                };
                answer
            } else {
                self.answers.next().await
            };
            let Some(message) = answer else {
                self.open = None;
                self.ended = true;
                return Pulled::Failed("the inbox subscription ended".into());
            };
            match message.status {
                None | Some(StatusCode::OK) => {
                    if let Some(open) = &mut self.open {
                        open.left = open.left.saturating_sub(1);
                        if open.left == 0 {
                            self.open = None;
                            self.filled = true;
                        }
                    }
                    return Pulled::Message(jetstream::Message {
                        message,
                        context: self.context.clone(),
                    });
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(status) => {
                    // An answer about a request given up on or already
                    // filled ends nothing.
                    let about = message.subject.rsplit('.').next();
                    let about = about.and_then(|n| n.parse::<u64>().ok());
                    if !matches!((&self.open, about), (Some(open), Some(n)) if open.number == n) {
                        continue;
                    }
                    self.open = None;
                    return match status {
                        StatusCode::TIMEOUT | StatusCode::NOT_FOUND => Pulled::Ended,
                        _ => Pulled::Failed(format!(
                            "{status}: {}",
                            message.description.as_deref().unwrap_or("no description")
                        )),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use async_nats::jetstream::consumer::{PullConsumer, pull};

    const STREAM: &str = "T";
    const CONSUMER: &str = "c";

    /// A server of its own with stream `T` (`t.>`) and consumer `c`, made
    /// with `config` (its name set here); the dispatch tests' fixture.
    pub(in crate::dispatch) async fn stream_with_consumer(
        config: pull::Config,
    ) -> (
        hookmesh_test_support::NatsServer,
        jetstream::Context,
        PullConsumer,
    ) {
        let nats = hookmesh_test_support::NatsServer::start().expect("nats-server");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client);
        let stream = js
            .create_stream(jetstream::stream::Config {
                name: STREAM.into(),
                subjects: vec!["t.>".into()],
                ..Default::default()
            })
            .await
            .expect("stream");
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(CONSUMER.into()),
                ..config
            })
            .await
            .expect("consumer");
        (nats, js, consumer)
    }

    /// [`stream_with_consumer`] with the default consumer, holding `events`.
    async fn consumer_with(
        events: usize,
    ) -> (hookmesh_test_support::NatsServer, jetstream::Context) {
        let (nats, js, _) = stream_with_consumer(pull::Config::default()).await;
        for i in 0..events {
            publish(&js, i).await;
        }
        (nats, js)
    }

    /// Stores an event on `t.<i>`.
    pub(in crate::dispatch) async fn publish(js: &jetstream::Context, i: usize) {
        js.publish(format!("t.{i}"), "e".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// The next answer within `within`.
    async fn answer(puller: &mut Puller, within: Duration) -> Option<Pulled> {
        tokio::time::timeout(within, puller.next()).await.ok()
    }

    fn seq(pulled: Option<Pulled>) -> u64 {
        match pulled {
            Some(Pulled::Message(message)) => message.info().expect("metadata").stream_sequence,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_filled_request_ends_after_its_last_delivery_and_the_next_goes_on_the_same_inbox() {
        let (_nats, js) = consumer_with(5).await;
        let mut puller = Puller::new(&js, STREAM, CONSUMER).await.expect("inbox");
        assert!(!puller.is_open());
        puller
            .request(3, Duration::from_secs(5))
            .await
            .expect("pull");
        let second = Duration::from_secs(1);
        assert_eq!(seq(answer(&mut puller, second).await), 1);
        assert_eq!(seq(answer(&mut puller, second).await), 2);
        assert_eq!(seq(answer(&mut puller, second).await), 3);
        assert!(puller.is_open(), "its end is told by the next call");
        assert!(matches!(
            answer(&mut puller, second).await,
            Some(Pulled::Ended)
        ));
        assert!(!puller.is_open());

        puller
            .request(10, Duration::from_millis(500))
            .await
            .expect("pull");
        assert_eq!(seq(answer(&mut puller, second).await), 4);
        assert_eq!(seq(answer(&mut puller, second).await), 5);
        // Two of ten: the server ends it at its expiry.
        assert!(matches!(
            answer(&mut puller, Duration::from_secs(3)).await,
            Some(Pulled::Ended)
        ));
        assert!(!puller.is_open());
    }

    #[tokio::test]
    async fn the_end_of_a_request_given_up_on_does_not_end_the_next_and_its_delivery_still_arrives()
    {
        let (_nats, js) = consumer_with(0).await;
        let mut puller = Puller::new(&js, STREAM, CONSUMER).await.expect("inbox");
        // Given up on at once: the server keeps it open for 500 ms and
        // then answers 408 on its own reply subject.
        puller
            .request(1, Duration::from_millis(500))
            .await
            .expect("pull");
        puller
            .request(1, Duration::from_secs(10))
            .await
            .expect("pull");
        assert!(
            answer(&mut puller, Duration::from_secs(2)).await.is_none(),
            "the first request's expiry ended the second"
        );
        assert!(puller.is_open());
        publish(&js, 0).await;
        assert_eq!(seq(answer(&mut puller, Duration::from_secs(2)).await), 1);
        assert!(matches!(
            answer(&mut puller, Duration::from_secs(1)).await,
            Some(Pulled::Ended)
        ));

        // A delivery to a request given up on, still open on the server,
        // reaches the owner with no request open.
        let mut late = Puller::new(&js, STREAM, CONSUMER).await.expect("inbox");
        late.request(1, Duration::from_secs(10))
            .await
            .expect("pull");
        late.open = None;
        assert!(!late.is_open());
        publish(&js, 1).await;
        assert_eq!(seq(answer(&mut late, Duration::from_secs(2)).await), 2);
    }

    #[tokio::test]
    async fn a_request_the_server_never_answers_is_forgotten_past_its_expiry() {
        let (_nats, js) = consumer_with(0).await;
        let mut puller = Puller::new(&js, STREAM, CONSUMER).await.expect("inbox");
        // Requests go to a subscriber that never answers (as a consumer
        // leader that went away with the request).
        let _silent = js
            .client()
            .subscribe("silent.next")
            .await
            .expect("subscribe");
        js.client().flush().await.expect("flush");
        puller.next_subject = "silent.next".into();
        puller.forgotten_after = Duration::from_millis(300);
        let started = Instant::now();
        puller
            .request(1, Duration::from_millis(200))
            .await
            .expect("pull");
        match answer(&mut puller, Duration::from_secs(5)).await {
            Some(Pulled::Forgotten) => {}
            other => panic!("expected the request forgotten, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert!(!puller.is_open());
    }
}
