//! Per-entity order inside a partition owner: a FIFO per busy entity.
//!
//! Events of many entities are in flight at once; an entity's events run
//! one at a time, in stream order. An event whose entity is idle starts at
//! once; one whose entity is busy waits in that entity's queue, and starts
//! when the entity's running event is done. One entity's slow, failing or
//! held event therefore delays that entity alone (the model of Confluent's
//! parallel consumer, "key" ordering).

use std::collections::{HashMap, VecDeque};

/// The per-entity queues of one partition.
#[derive(Debug)]
pub struct EntityQueues<T> {
    /// Busy entities and the events waiting behind their running one, by
    /// stream sequence.
    busy: HashMap<String, VecDeque<(u64, T)>>,
    waiting: usize,
}

impl<T> Default for EntityQueues<T> {
    fn default() -> Self {
        EntityQueues {
            busy: HashMap::new(),
            waiting: 0,
        }
    }
}

impl<T> EntityQueues<T> {
    /// Offers event `seq` of `entity`: `Some(item)` when it may start now
    /// (the entity is busy from then on), `None` when it waits its turn.
    pub fn offer(&mut self, entity: &str, seq: u64, item: T) -> Option<T> {
        match self.busy.get_mut(entity) {
            None => {
                self.busy.insert(entity.to_string(), VecDeque::new());
                Some(item)
            }
            Some(queue) => {
                // Stream order, also for a redelivery that arrives after a
                // later event of the same entity.
                let at = queue.partition_point(|(s, _)| *s < seq);
                queue.insert(at, (seq, item));
                self.waiting += 1;
                None
            }
        }
    }

    /// The running event of `entity` is done: its next event, which is
    /// running from now on, or `None` when the entity is idle.
    pub fn finish(&mut self, entity: &str) -> Option<(u64, T)> {
        let queue = self.busy.get_mut(entity)?;
        match queue.pop_front() {
            Some(next) => {
                self.waiting -= 1;
                Some(next)
            }
            None => {
                self.busy.remove(entity);
                None
            }
        }
    }

    /// Takes the events waiting behind `entity`'s running one, in order;
    /// the entity stays busy.
    pub fn take_waiting(&mut self, entity: &str) -> Vec<(u64, T)> {
        let taken: Vec<_> = self
            .busy
            .get_mut(entity)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default();
        self.waiting -= taken.len();
        taken
    }

    /// Every waiting event of every entity (each entity's in order); the
    /// queues are empty afterwards.
    pub fn take_all(&mut self) -> Vec<(u64, T)> {
        let mut all: Vec<(u64, T)> = self.busy.drain().flat_map(|(_, q)| q).collect();
        all.sort_by_key(|(seq, _)| *seq);
        self.waiting = 0;
        all
    }

    /// The waiting events (not counting the running ones).
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether `entity` has an event running.
    pub fn is_busy(&self, entity: &str) -> bool {
        self.busy.contains_key(entity)
    }

    /// Every waiting event.
    pub fn iter_waiting(&self) -> impl Iterator<Item = &T> {
        self.busy
            .values()
            .flat_map(|q| q.iter().map(|(_, item)| item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_entity_starts_at_once_and_a_busy_one_queues_in_order() {
        let mut q = EntityQueues::default();
        assert_eq!(q.offer("A", 1, "a1"), Some("a1"));
        assert_eq!(q.offer("A", 3, "a3"), None);
        assert_eq!(
            q.offer("A", 2, "a2"),
            None,
            "a redelivery of an earlier event"
        );
        assert_eq!(q.offer("B", 4, "b4"), Some("b4"), "B does not wait for A");
        assert_eq!(q.waiting(), 2);
        assert_eq!(q.finish("A"), Some((2, "a2")));
        assert_eq!(q.finish("A"), Some((3, "a3")));
        assert_eq!(q.finish("A"), None);
        assert!(!q.is_busy("A"));
        assert_eq!(q.offer("A", 5, "a5"), Some("a5"), "idle again");
        assert_eq!(q.finish("B"), None);
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn a_failing_entity_holds_back_its_own_events_only() {
        let mut q = EntityQueues::default();
        assert!(q.offer("bad", 1, 1).is_some());
        let mut started = Vec::new();
        for (seq, entity) in (2..102).map(|s| (s, if s % 10 == 0 { "bad" } else { "ok" })) {
            if let Some(item) = q.offer(&format!("{entity}{seq}"), seq, seq) {
                started.push(item);
            }
        }
        // Every other entity started although "bad" never finished.
        assert_eq!(started.len(), 100);
    }

    #[test]
    fn waiting_events_can_be_taken_for_a_hold_or_a_handover() {
        let mut q = EntityQueues::default();
        q.offer("A", 1, 1);
        q.offer("A", 2, 2);
        q.offer("A", 4, 4);
        q.offer("B", 3, 3);
        q.offer("B", 5, 5);
        assert_eq!(q.iter_waiting().count(), 3);
        assert_eq!(q.take_waiting("A"), vec![(2, 2), (4, 4)]);
        assert!(q.is_busy("A"));
        assert_eq!(q.waiting(), 1);
        assert_eq!(q.take_all(), vec![(5, 5)]);
        assert_eq!(q.waiting(), 0);
        assert!(!q.is_busy("B"));
    }
}
