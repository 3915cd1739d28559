//! Memberlist's `TransmitLimitedQueue`: each message is gossiped a bounded number of times
//! (`retransmit_mult × ⌈log10(N + 1)⌉` for N members), the least sent first, and a newer
//! message about a node replaces an older one still queued.

/// One queued message.
struct Queued {
    /// The node it is about, for messages that supersede each other (alive, suspect, dead).
    about: Option<String>,
    message: Vec<u8>,
    transmits: u32,
    /// Queue order: newer messages go first among those sent as often.
    id: u64,
}

#[derive(Default)]
pub(super) struct Queue {
    items: Vec<Queued>,
    next_id: u64,
}

/// What framing costs per message in a compound packet (its length).
const PER_MESSAGE: usize = 2;

impl Queue {
    pub fn push(&mut self, about: Option<String>, message: Vec<u8>) {
        if let Some(node) = &about {
            self.items
                .retain(|item| item.about.as_deref() != Some(node.as_str()));
        }
        self.next_id += 1;
        self.items.push(Queued {
            about,
            message,
            transmits: 0,
            id: self.next_id,
        });
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Messages for one packet of at most `budget` bytes, each counted as sent once; those sent
    /// `limit` times leave the queue.
    pub fn take(&mut self, budget: usize, limit: u32) -> Vec<Vec<u8>> {
        self.items
            .sort_by_key(|item| (item.transmits, std::cmp::Reverse(item.id)));
        let mut used = 0;
        let mut out = Vec::new();
        for item in &mut self.items {
            let cost = item.message.len() + PER_MESSAGE;
            if used + cost > budget {
                continue;
            }
            used += cost;
            item.transmits += 1;
            out.push(item.message.clone());
        }
        self.items.retain(|item| item.transmits < limit);
        out
    }
}

/// How many times a message is gossiped in a cluster of `members` (memberlist's
/// `retransmitLimit`).
pub(super) fn retransmit_limit(mult: u32, members: usize) -> u32 {
    let scale = ((members + 1) as f64).log10().ceil().max(1.0) as u32;
    mult * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_go_out_a_limited_number_of_times_least_sent_first() {
        let mut queue = Queue::default();
        queue.push(Some("a".into()), vec![1; 10]);
        queue.push(None, vec![2; 10]);
        assert_eq!(queue.take(100, 2).len(), 2);
        queue.push(None, vec![3; 10]);
        // A small packet takes the one sent least.
        assert_eq!(queue.take(12, 2), vec![vec![3; 10]]);
        assert_eq!(queue.len(), 3);
        // Each went out once; the second time is the last.
        assert_eq!(queue.take(100, 2).len(), 3);
        assert_eq!(queue.len(), 0);
        assert!(queue.take(100, 2).is_empty());
    }

    #[test]
    fn a_newer_message_about_a_node_replaces_the_queued_one() {
        let mut queue = Queue::default();
        queue.push(Some("a".into()), vec![1]);
        queue.push(Some("b".into()), vec![2]);
        queue.push(Some("a".into()), vec![3]);
        let mut sent = queue.take(100, 1);
        sent.sort();
        assert_eq!(sent, vec![vec![2], vec![3]]);
    }

    #[test]
    fn the_limit_grows_with_the_cluster() {
        assert_eq!(retransmit_limit(4, 1), 4);
        assert_eq!(retransmit_limit(4, 9), 4);
        assert_eq!(retransmit_limit(4, 10), 8);
        assert_eq!(retransmit_limit(4, 100), 12);
    }
}
