//! Decision events for `idgate events`: the last events, and every new
//! one as it is written, for any number of followers. A follower that
//! falls behind is told how many it missed; the audit log is not held up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

/// Events kept for a request without `--follow`.
pub const RECENT: usize = 1000;
/// Events a follower may fall behind by before it misses some.
const FOLLOW_BUFFER: usize = 4096;

/// One event as a JSON line (without the newline).
pub type Line = Arc<str>;

/// The feed; cheap to clone.
#[derive(Clone)]
pub struct EventFeed {
    live: broadcast::Sender<Line>,
    recent: Arc<Mutex<VecDeque<Line>>>,
}

impl Default for EventFeed {
    fn default() -> Self {
        Self {
            live: broadcast::channel(FOLLOW_BUFFER).0,
            recent: Arc::default(),
        }
    }
}

impl EventFeed {
    /// Offers one event to followers and to the recent list.
    pub fn publish(&self, line: &[u8]) {
        let line: Line = String::from_utf8_lossy(line).into();
        let mut recent = self.recent.lock().expect("recent events");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(line.clone());
        drop(recent);
        // No follower is not an error.
        let _ = self.live.send(line);
    }

    /// The recent events, oldest first, and (subscribed at the same
    /// moment, so nothing falls between) every later one.
    pub fn subscribe(&self) -> (Vec<Line>, broadcast::Receiver<Line>) {
        let recent = self.recent.lock().expect("recent events");
        (recent.iter().cloned().collect(), self.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_events_and_hands_on_new_ones() {
        let feed = EventFeed::default();
        for i in 0..RECENT + 5 {
            feed.publish(format!("{{\"n\":{i}}}").as_bytes());
        }
        let (recent, mut live) = feed.subscribe();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(&*recent[0], "{\"n\":5}");
        feed.publish(b"{\"n\":\"new\"}");
        assert_eq!(&*live.try_recv().unwrap(), "{\"n\":\"new\"}");
    }
}
