//! The share writes a store lets reach its volume at once ([`super::StoreOptions::write_depth`]).
//!
//! A put waits here, in the order the puts came, with its share in its buffer and its header
//! made, until fewer than `depth` share writes are under way; everything else a put does (its
//! allocation, its index entry) runs beside the writes. So the volume is given what fio's
//! iodepth gives it, however many connections put at once: on this VM's disk a durable write
//! at 8 in flight took twice as long as at 4, for no more MB/s (docs/design.md, "The volume's
//! write depth").

use std::sync::{Condvar, Mutex, MutexGuard};

pub(super) struct WriteGate {
    depth: usize,
    state: Mutex<State>,
    turn: Condvar,
}

#[derive(Default)]
struct State {
    /// Writes under way.
    writing: usize,
    /// The ticket the next put to arrive takes.
    next_ticket: u64,
    /// The ticket whose turn it is to go in.
    next_in: u64,
}

/// A write under way: the gate lets the next one in when this is dropped.
pub(super) struct Writing<'a>(&'a WriteGate);

impl WriteGate {
    /// At most `depth` writes at once (at least 1).
    pub(super) fn new(depth: usize) -> Self {
        Self {
            depth: depth.max(1),
            state: Mutex::default(),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this caller's turn (first come, first in) and a free place.
    pub(super) fn enter(&self) -> Writing<'_> {
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        while s.next_in != ticket || s.writing >= self.depth {
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.next_in += 1;
        s.writing += 1;
        // The next ticket may find a place free too (only worth a wake-up if one is waiting).
        let next_may_go = s.writing < self.depth && s.next_in != s.next_ticket;
        drop(s);
        if next_may_go {
            self.turn.notify_all();
        }
        Writing(self)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.writing -= 1;
        let waiting = s.next_in != s.next_ticket;
        drop(s);
        if waiting {
            self.0.turn.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// However many threads come at once, `depth` are in at a time, and every one gets in.
    #[test]
    fn depth_writers_at_a_time_and_every_one_in() {
        for depth in [1, 3] {
            let gate = Arc::new(WriteGate::new(depth));
            let (now, most, done) = (
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicUsize::new(0)),
            );
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (gate, now, most, done) =
                        (gate.clone(), now.clone(), most.clone(), done.clone());
                    std::thread::spawn(move || {
                        for _ in 0..5 {
                            let _w = gate.enter();
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(n, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(2));
                            now.fetch_sub(1, Ordering::SeqCst);
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(done.load(Ordering::SeqCst), 40);
            assert_eq!(most.load(Ordering::SeqCst), depth, "depth {depth}");
            assert_eq!(gate.lock().writing, 0);
        }
    }

    /// Those waiting go in in the order they came.
    #[test]
    fn waiters_go_in_in_the_order_they_came() {
        let gate = Arc::new(WriteGate::new(1));
        let first = gate.enter();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for i in 0..4 {
            let (g, order) = (gate.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let _w = g.enter();
                order.lock().unwrap().push(i);
            }));
            // Each has taken its ticket before the next starts.
            while gate.lock().next_ticket < i + 2 {
                std::thread::yield_now();
            }
        }
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
    }
}
