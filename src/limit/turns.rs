//! Turns: within one lane of one upstream, on this replica, who asks the store next.
//!
//! A request of the `normal` or `low` lane that cannot reserve its slot within its lane's horizon
//! (see `admit`) waits for its turn instead of asking again and again. One request per lane holds
//! the turn: it sleeps until its slot is near, asks, and hands the turn on as soon as it has a
//! reservation. The next holder is taken consumer by consumer in rotation, and in arrival order
//! within a consumer, so a consumer that sends ten times as much as another waits behind the
//! other's calls, not in front of them: within a lane, consumers take turns.
//!
//! A turn is handed on when its holder is dropped, whatever happens to it (admitted, refused,
//! its client gone); a waiter that gives up after it was handed the turn passes it on too.
//! Bounded: at most [`MAX_WAITERS`] wait per lane; past that a request asks without a turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::config::Lane;

/// Most requests waiting for a turn in one lane of one upstream.
pub const MAX_WAITERS: usize = 100_000;

/// (upstream, lane).
type LineId = (Arc<str>, Lane);

#[derive(Default)]
struct Line {
    held: bool,
    /// Consumers with requests waiting, in turn order; each with its waiters in arrival order.
    queues: VecDeque<(Arc<str>, VecDeque<oneshot::Sender<()>>)>,
    waiting: usize,
}

/// Every lane's line on this replica.
#[derive(Default)]
pub struct Turns {
    lines: Mutex<HashMap<LineId, Line>>,
}

/// The turn of a lane: handed on when dropped.
pub struct Turn {
    turns: Arc<Turns>,
    line: LineId,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.turns.hand_on(&self.line);
    }
}

/// What [`Turns::take`] gives: the turn at once, a place in line, or nothing (the line is full).
pub enum Place {
    Now(Turn),
    Waiting(Waiting),
    Full,
}

/// A place in line. Dropped after the turn reached it (its waiter gave up just then), it hands
/// the turn on.
pub struct Waiting {
    receiver: Option<oneshot::Receiver<()>>,
    turns: Arc<Turns>,
    line: LineId,
}

impl Waiting {
    /// Waits for the turn.
    pub async fn turn(mut self) -> Turn {
        if let Some(receiver) = self.receiver.as_mut() {
            // The sender is only dropped with a turn sent, or by a line that is gone; either way
            // this request holds the turn now.
            let _ = receiver.await;
        }
        self.receiver = None;
        Turn { turns: self.turns.clone(), line: self.line.clone() }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut receiver) = self.receiver.take() {
            receiver.close();
            if receiver.try_recv().is_ok() {
                self.turns.hand_on(&self.line);
            }
        }
    }
}

impl Turns {
    /// Whether anyone holds or waits for the turn of this lane.
    pub fn busy(&self, upstream: &Arc<str>, lane: Lane) -> bool {
        crate::kit::lock(&self.lines).get(&(upstream.clone(), lane)).is_some_and(|line| line.held)
    }

    /// The turn of `lane` for a request of `consumer`: at once if no one holds it, else a place
    /// in line behind the other consumers' next requests and this consumer's earlier ones.
    pub fn take(self: &Arc<Self>, upstream: &Arc<str>, lane: Lane, consumer: &Arc<str>) -> Place {
        let id = (upstream.clone(), lane);
        let mut lines = crate::kit::lock(&self.lines);
        let line = lines.entry(id.clone()).or_default();
        if !line.held {
            line.held = true;
            return Place::Now(Turn { turns: self.clone(), line: id });
        }
        if line.waiting >= MAX_WAITERS {
            return Place::Full;
        }
        let (sender, receiver) = oneshot::channel();
        match line.queues.iter_mut().find(|(waiting, _)| waiting == consumer) {
            Some((_, queue)) => queue.push_back(sender),
            None => line.queues.push_back((consumer.clone(), VecDeque::from([sender]))),
        }
        line.waiting += 1;
        Place::Waiting(Waiting { receiver: Some(receiver), turns: self.clone(), line: id })
    }

    /// The holder is done: the next consumer's next waiter (that is still waiting) gets the turn.
    fn hand_on(&self, id: &LineId) {
        let mut lines = crate::kit::lock(&self.lines);
        let Some(line) = lines.get_mut(id) else { return };
        while let Some((consumer, mut queue)) = line.queues.pop_front() {
            let next = queue.pop_front();
            if !queue.is_empty() {
                line.queues.push_back((consumer, queue));
            }
            let Some(next) = next else { continue };
            line.waiting = line.waiting.saturating_sub(1);
            if next.send(()).is_ok() {
                return;
            }
        }
        line.held = false;
        lines.remove(id);
    }

    /// Requests waiting for a turn, over every lane (for tests and `/quotas`).
    pub fn waiting(&self) -> usize {
        crate::kit::lock(&self.lines).values().map(|line| line.waiting).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(place: Place) -> Waiting {
        match place {
            Place::Waiting(waiting) => waiting,
            _ => panic!("expected a place in line"),
        }
    }

    #[tokio::test]
    async fn consumers_take_turns_and_each_keeps_its_order() {
        let turns = Arc::new(Turns::default());
        let (upstream, heavy, light): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("hubspot"), Arc::from("heavy"), Arc::from("light"));
        let Place::Now(first) = turns.take(&upstream, Lane::Normal, &heavy) else { panic!("the first goes at once") };
        assert!(turns.busy(&upstream, Lane::Normal));
        assert!(!turns.busy(&upstream, Lane::Low), "lanes have lines of their own");
        let mut line = Vec::new();
        for at in 0..4 {
            line.push(("heavy", at, waiting(turns.take(&upstream, Lane::Normal, &heavy))));
        }
        line.push(("light", 0, waiting(turns.take(&upstream, Lane::Normal, &light))));
        line.push(("light", 1, waiting(turns.take(&upstream, Lane::Normal, &light))));
        assert_eq!(turns.waiting(), 6);
        let mut order = Vec::new();
        let (send, mut got) = tokio::sync::mpsc::unbounded_channel();
        for (consumer, at, place) in line {
            let send = send.clone();
            tokio::spawn(async move {
                let turn = place.turn().await;
                send.send((consumer, at)).unwrap();
                tokio::task::yield_now().await;
                drop(turn);
            });
        }
        drop(first);
        for _ in 0..6 {
            order.push(got.recv().await.unwrap());
        }
        assert_eq!(
            order,
            [("heavy", 0), ("light", 0), ("heavy", 1), ("light", 1), ("heavy", 2), ("heavy", 3)],
            "heavy, light, heavy, light, then what is left"
        );
        // The last holder hands on after it reported: then the lane is free.
        for _ in 0..100 {
            if !turns.busy(&upstream, Lane::Normal) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(!turns.busy(&upstream, Lane::Normal), "the last one out frees the lane");
        assert_eq!(turns.waiting(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_its_turn_on() {
        let turns = Arc::new(Turns::default());
        let (upstream, a): (Arc<str>, Arc<str>) = (Arc::from("u"), Arc::from("a"));
        let Place::Now(holder) = turns.take(&upstream, Lane::Low, &a) else { panic!() };
        let gone = waiting(turns.take(&upstream, Lane::Low, &a));
        let next = waiting(turns.take(&upstream, Lane::Low, &a));
        drop(gone);
        drop(holder);
        let turn = tokio::time::timeout(std::time::Duration::from_secs(1), next.turn()).await.unwrap();
        // Handed the turn, then gone before looking: the turn is not lost.
        let late = waiting(turns.take(&upstream, Lane::Low, &a));
        let after = waiting(turns.take(&upstream, Lane::Low, &a));
        drop(turn);
        drop(late);
        tokio::time::timeout(std::time::Duration::from_secs(1), after.turn()).await.unwrap();
    }
}
