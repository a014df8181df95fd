//! The outbox on its own: repeated batches and repeated ids are stored once, a gap is never
//! acknowledged past, and the deduplication window stays bounded.

use backhaul_events::event::parse_event;
use backhaul_events::{BatchEntry, BatchFrame, BatchRefusal, Epoch};
use backhaul_relay::outbox::{Head, OutboxOptions, RedbOutbox};

fn options(dedup_ids: u64) -> OutboxOptions {
    OutboxOptions {
        cache_size: 1 << 20,
        dedup_ids,
        frontier_events: 1000,
        max_bytes: 1 << 30,
        keep_batches: true,
    }
}

fn batch(epoch: u128, first_seq: u64, ids: &[&str]) -> BatchFrame {
    batch_after(epoch, first_seq - 1, first_seq, ids)
}

/// A batch sent when the agent had everything up to `acked_through` acknowledged.
fn batch_after(epoch: u128, acked_through: u64, first_seq: u64, ids: &[&str]) -> BatchFrame {
    let events: Vec<BatchEntry> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| BatchEntry {
            seq: first_seq + i as u64,
            received_at_ms: 0,
            event: parse_event(
                format!(r#"{{"v":1,"id":"{id}","type":"count","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"location":"L-{id}"}}"#)
                    .as_bytes(),
            )
            .unwrap(),
        })
        .collect();
    BatchFrame {
        site: "wh".into(),
        epoch: Epoch(epoch),
        acked_through,
        first_seq,
        last_seq: first_seq + ids.len() as u64 - 1,
        events,
        signature: None,
    }
}

#[test]
fn repeats_are_stored_once_and_gaps_are_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path(), options(1000)).unwrap();
    let first = outbox.store(&[batch(1, 1, &["a", "b", "c"])]).unwrap();
    assert_eq!((first[0].stored, first[0].acked_through), (3, 3));
    // The same batch again (a re-send after a lost ack): nothing new, same acknowledgement.
    let again = outbox.store(&[batch(1, 1, &["a", "b", "c"])]).unwrap();
    assert_eq!(
        (again[0].stored, again[0].duplicates, again[0].acked_through),
        (0, 3, 3)
    );
    // A batch past a gap is not stored, and the acknowledgement does not move past the gap.
    let gap = outbox.store(&[batch_after(1, 3, 10, &["x"])]).unwrap();
    assert_eq!(gap[0].refused, Some(BatchRefusal::Gap));
    assert_eq!((gap[0].stored, gap[0].acked_through), (0, 3));
    // A new epoch (a rebuilt agent log) repeating an id: stored once.
    let rebuilt = outbox.store(&[batch(2, 1, &["c", "d"])]).unwrap();
    assert_eq!((rebuilt[0].stored, rebuilt[0].duplicates), (1, 1));
    assert_eq!(outbox.depth(), 4);
}

#[test]
fn the_deduplication_window_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path(), options(5)).unwrap();
    let ids: Vec<String> = (0..20).map(|i| format!("e{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    outbox.store(&[batch(1, 1, &refs)]).unwrap();
    // Only the 5 newest ids are remembered: a repeat of the newest is dropped, a repeat of the
    // oldest (under a new epoch, so not recognised by sequence) is stored again.
    let repeat = outbox.store(&[batch(2, 1, &["e19", "e0"])]).unwrap();
    assert_eq!((repeat[0].duplicates, repeat[0].stored), (1, 1));
}

#[test]
fn ids_are_remembered_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let outbox = RedbOutbox::open(dir.path(), options(1000)).unwrap();
        outbox.store(&[batch(1, 1, &["a", "b"])]).unwrap();
    }
    let outbox = RedbOutbox::open(dir.path(), options(1000)).unwrap();
    // A rebuilt agent log (new epoch) repeating both ids: nothing stored twice.
    let repeat = outbox.store(&[batch(2, 1, &["b", "a", "c"])]).unwrap();
    assert_eq!((repeat[0].stored, repeat[0].duplicates), (1, 2));
    assert_eq!(outbox.depth(), 3);
    let (seq, found) = outbox.find_pending("wh", "c").unwrap().unwrap();
    assert_eq!((seq, found.event.id.as_str()), (3, "c"));
    assert!(outbox.find_pending("wh", "zz").unwrap().is_none());
}

/// A batch whose events all share one order (one ordering key), `order`.
fn order_batch(first_seq: u64, order: &str, ids: &[&str]) -> BatchFrame {
    let mut frame = batch(1, first_seq, ids);
    for (entry, id) in frame.events.iter_mut().zip(ids) {
        entry.event = parse_event(
            format!(r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"order":"{order}"}}"#)
                .as_bytes(),
        )
        .unwrap();
    }
    frame
}

/// Options whose frontier holds `events` events.
fn with_frontier(events: usize) -> OutboxOptions {
    OutboxOptions {
        frontier_events: events,
        ..options(1000)
    }
}

fn head_ids(heads: &[Head]) -> Vec<&str> {
    heads.iter().map(|h| h.event.event.id.as_str()).collect()
}

#[test]
fn queues_per_key_deliver_in_order_through_a_frontier_smaller_than_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let small = with_frontier(3);
    let outbox = RedbOutbox::open(dir.path(), small).unwrap();
    outbox
        .store(&[
            order_batch(1, "SO-1", &["a1", "a2", "a3"]),
            order_batch(4, "SO-2", &["b1"]),
            order_batch(5, "SO-1", &["a4"]),
            order_batch(6, "SO-3", &["c1", "c2"]),
        ])
        .unwrap();
    // The frontier holds a1-a3: one head, SO-1's, though three orders wait.
    let heads = outbox.heads(10, |_| false).unwrap();
    let ids = head_ids(&heads);
    assert_eq!(ids, ["a1"]);
    // Deliver heads until the outbox is empty, one per key at a time, as the engine does.
    let mut delivered = Vec::new();
    for _ in 0..20 {
        let heads = outbox.heads(10, |_| false).unwrap();
        if heads.is_empty() {
            break;
        }
        let done: Vec<(u64, _)> = heads
            .iter()
            .map(|h| (h.outbox_seq, h.event.clone()))
            .collect();
        delivered.extend(heads.iter().map(|h| h.event.event.id.clone()));
        outbox.complete(&done, &[], None).unwrap();
    }
    assert_eq!(outbox.depth(), 0);
    let order_of = |prefix: char| -> Vec<&str> {
        delivered
            .iter()
            .map(String::as_str)
            .filter(|id| id.starts_with(prefix))
            .collect()
    };
    assert_eq!(order_of('a'), ["a1", "a2", "a3", "a4"]);
    assert_eq!(order_of('b'), ["b1"]);
    assert_eq!(order_of('c'), ["c1", "c2"]);
    // A held-back key leaves the others to go on.
    outbox
        .store(&[
            order_batch(8, "SO-4", &["d1", "d2"]),
            order_batch(10, "SO-5", &["e1"]),
        ])
        .unwrap();
    let heads = outbox.heads(10, |queue| queue.ends_with(b"SO-4")).unwrap();
    let ids = head_ids(&heads);
    assert_eq!(ids, ["e1"]);
    assert!(!outbox.frontier_blocked());
    // After a restart the frontier is loaded again from the outbox.
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path(), small).unwrap();
    let heads = outbox.heads(10, |_| false).unwrap();
    let ids = head_ids(&heads);
    assert_eq!(ids, ["d1", "e1"]);
}

#[test]
fn an_empty_outbox_continues_only_from_what_the_agent_had_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path(), options(1000)).unwrap();
    // The agent had 1-3 acknowledged by an outbox since moved aside; batches 4-7 were sent
    // while this relay was away and never reached it. Batch 8 must not be taken as the start.
    let late = outbox.store(&[batch_after(5, 3, 8, &["h"])]).unwrap();
    assert_eq!(late[0].refused, Some(BatchRefusal::Gap));
    assert_eq!((late[0].stored, late[0].acked_through), (0, 0));
    // The re-send from the agent's first unacknowledged event is stored, and so is what follows.
    let resent = outbox
        .store(&[
            batch_after(5, 3, 4, &["d", "e", "f", "g"]),
            batch_after(5, 3, 8, &["h"]),
        ])
        .unwrap();
    assert_eq!((resent[0].stored, resent[0].acked_through), (4, 7));
    assert_eq!((resent[1].stored, resent[1].acked_through), (1, 8));
    let ids: Vec<String> = outbox
        .pending(10)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.event.id)
        .collect();
    assert_eq!(ids, ["d", "e", "f", "g", "h"]);
}

#[test]
fn an_outbox_behind_the_agent_continues_from_the_agents_acknowledged_number() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path(), options(1000)).unwrap();
    outbox.store(&[batch(1, 1, &["a", "b", "c"])]).unwrap();
    // Restored from a backup taken at 3; another outbox had acknowledged up to 10 since.
    let next = outbox.store(&[batch_after(1, 10, 11, &["k"])]).unwrap();
    assert_eq!(next[0].refused, None);
    assert_eq!((next[0].stored, next[0].acked_through), (1, 11));
}

#[test]
fn a_full_outbox_refuses_new_batches_until_deliveries_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let small = OutboxOptions {
        max_bytes: 200,
        ..options(1000)
    };
    let outbox = RedbOutbox::open(dir.path(), small).unwrap();
    let ids: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let first = outbox.store(&[batch(1, 1, &refs)]).unwrap();
    assert_eq!((first[0].stored, first[0].refused), (4, None));
    assert!(outbox.held_bytes() >= 200, "{}", outbox.held_bytes());
    // Full: a new batch is refused and not acknowledged past what is stored...
    let refused = outbox.store(&[batch(1, 5, &["g"])]).unwrap();
    assert_eq!(refused[0].refused, Some(BatchRefusal::OutboxFull));
    assert_eq!((refused[0].stored, refused[0].acked_through), (0, 4));
    // ...but a re-sent batch already stored is still acknowledged.
    let again = outbox.store(&[batch(1, 1, &refs)]).unwrap();
    assert_eq!((again[0].refused, again[0].acked_through), (None, 4));
    // Delivering makes room, and the count survives a restart.
    let pending = outbox.pending(4).unwrap();
    outbox.complete(&pending, &[], None).unwrap();
    assert_eq!(outbox.held_bytes(), 0);
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path(), small).unwrap();
    assert_eq!(outbox.held_bytes(), 0);
    let taken = outbox.store(&[batch(1, 5, &["g"])]).unwrap();
    assert_eq!((taken[0].stored, taken[0].refused), (1, None));
    assert!(outbox.held_bytes() > 0);
}

#[test]
fn a_frontier_full_of_held_back_keys_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let small = with_frontier(3);
    let outbox = RedbOutbox::open(dir.path(), small).unwrap();
    outbox
        .store(&[
            order_batch(1, "SO-1", &["a1", "a2", "a3"]),
            order_batch(4, "SO-2", &["b1"]),
        ])
        .unwrap();
    // SO-1 is retrying and fills the frontier: SO-2 waits behind it, and the outbox says so.
    let heads = outbox.heads(10, |queue| queue.ends_with(b"SO-1")).unwrap();
    assert!(heads.is_empty());
    assert!(outbox.frontier_blocked());
    let heads = outbox.heads(10, |_| false).unwrap();
    assert_eq!(heads.len(), 1);
    assert!(!outbox.frontier_blocked());
}

#[test]
fn batches_are_recorded_for_traces_only_when_traces_are_kept() {
    use backhaul_relay::outbox::Outbox;
    for keep_batches in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let outbox = RedbOutbox::open(
            dir.path(),
            OutboxOptions {
                keep_batches,
                ..options(1000)
            },
        )
        .unwrap();
        outbox.store(&[batch(1, 1, &["a", "b"])]).unwrap();
        let record = outbox.batch_of("wh", Epoch(1), 2).unwrap();
        assert_eq!(
            record.map(|r| (r.first_seq, r.last_seq)),
            keep_batches.then_some((1, 2)),
            "keep_batches = {keep_batches}"
        );
    }
}
