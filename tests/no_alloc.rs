//! The common path allocates nothing per command: after a warm-up transaction (which sizes the
//! session's output buffer), a pipelined session of many transactions, fed the way the runtime
//! feeds it, makes no heap allocation at all.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use ringmx::proto::{Event, Session, SessionConfig, Settings, Stop};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls on this thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

fn transaction(i: usize) -> Vec<u8> {
    let mut t =
        format!("MAIL FROM:<sender{i}@example.com> SIZE=500 BODY=8BITMIME\r\n").into_bytes();
    for r in 0..5 {
        t.extend_from_slice(format!("RCPT TO:<r{r}@example.org> NOTIFY=FAILURE\r\n").as_bytes());
    }
    t.extend_from_slice(b"DATA\r\nSubject: x\r\n\r\n..dot\r\nbody\r\n.\r\nRSET\r\nNOOP\r\n");
    t
}

/// Feed `input` split into `chunk`-byte reads, as the runtime would; returns bytes written.
fn drive(
    session: &mut Session,
    input: &[u8],
    chunk: usize,
    now: Instant,
    pending: &mut Vec<u8>,
) -> usize {
    let mut written = 0;
    for piece in input.chunks(chunk) {
        pending.extend_from_slice(piece);
        let mut feed = session.feed(pending, now);
        loop {
            match feed.next() {
                Some(Event::Mail { .. } | Event::Rcpt { .. }) => feed.accept(),
                Some(Event::MessageEnd { .. }) => feed.accept_message("0123456789AB"),
                Some(_) => {}
                None => {
                    written += feed.output().len();
                    feed.clear_output();
                    if feed.stop() != Stop::Flush {
                        break;
                    }
                }
            }
        }
        let consumed = feed.consumed();
        pending.drain(..consumed);
    }
    written
}

#[test]
fn no_heap_allocation_per_command() {
    // The counter sees allocations made on this thread.
    let before = allocations();
    std::hint::black_box(vec![0u8; 64]);
    assert!(allocations() > before);

    let settings = Arc::new(Settings::new(SessionConfig::default()).unwrap());
    let now = Instant::now();
    let mut session = Session::new(settings, now);
    let mut pending = Vec::with_capacity(8192);
    let mut input = b"EHLO client.example\r\n".to_vec();
    input.extend_from_slice(&transaction(0));
    drive(&mut session, &input, 4096, now, &mut pending);

    let many: Vec<u8> = (1..200).flat_map(transaction).collect();
    for chunk in [4096, 100, 7] {
        let before = allocations();
        let written = drive(&mut session, &many, chunk, now, &mut pending);
        let after = allocations();
        assert!(
            written > 199 * 8 * 10,
            "the session answered ({written} bytes)"
        );
        assert_eq!(
            after - before,
            0,
            "allocations while reading in {chunk}-byte reads"
        );
    }
}
