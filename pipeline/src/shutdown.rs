//! Graceful shutdown: one trigger, any number of handles that wait for it.

use tokio::sync::watch;

/// A handle that tells a worker (or relay, or server) to stop taking work and finish what is
/// in flight.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A trigger and its handle.
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Whether shutdown was asked for.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is asked for.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            // The trigger is gone without firing: nothing can stop us any more.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_handle_sees_the_trigger() {
        let (trigger, mut first) = Shutdown::new();
        let mut second = first.clone();
        assert!(!first.is_set());
        trigger.send_replace(true);
        first.wait().await;
        second.wait().await;
        assert!(second.is_set());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_trigger_never_fires() {
        let (trigger, mut handle) = Shutdown::new();
        drop(trigger);
        let waited =
            tokio::time::timeout(std::time::Duration::from_secs(3600), handle.wait()).await;
        assert!(waited.is_err());
        assert!(!handle.is_set());
    }
}
