//! Trying again after a pause that grows: the one backoff of every loop
//! that waits for NATS to be ready (consumers, watches, subscriptions), so
//! none of them spins and all of them stop promptly at shutdown.

use std::time::Duration;

use tokio::sync::watch;

/// The first pause.
const FIRST: Duration = Duration::from_millis(200);
/// The longest pause.
const LONGEST: Duration = Duration::from_secs(5);

/// A growing pause: 200 ms, doubling per failure, at most 5 s.
#[derive(Debug, Clone)]
pub struct Retry {
    delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { delay: FIRST }
    }
}

impl Retry {
    /// The pause the next wait takes.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// After a failure: waits the current pause (or until `shutdown`
    /// changes) and doubles it for next time.
    pub async fn pause(&mut self, shutdown: &mut watch::Receiver<bool>) {
        self.wait(shutdown).await;
        self.grow();
    }

    /// Doubles the pause (at most 5 s) without waiting.
    pub fn grow(&mut self) {
        self.delay = (self.delay * 2).min(LONGEST);
    }

    /// Between rounds that went well but ended (a pull or watch that
    /// closed): waits the current pause without growing it.
    pub async fn wait(&self, shutdown: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// After a success: back to the first pause.
    pub fn reset(&mut self) {
        self.delay = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_five_seconds_and_reset() {
        let mut retry = Retry::default();
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(retry.delay());
            retry.grow();
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000]);
        retry.reset();
        assert_eq!(retry.delay(), FIRST);
    }

    #[tokio::test]
    async fn a_shutdown_ends_the_pause_at_once() {
        let (stop, mut shutdown) = watch::channel(false);
        let mut retry = Retry {
            delay: Duration::from_secs(3600),
        };
        stop.send(true).expect("receiver alive");
        tokio::time::timeout(Duration::from_secs(5), retry.pause(&mut shutdown))
            .await
            .expect("the pause ended with the shutdown");
    }
}
