//! ringmx's SMTP core side by side with the `smtp-proto` crate on identical inputs.
//!
//! cargo bench --bench proto
//!
//! Groups: `command/*` (one line: framing + parsing), `transaction` (a whole pipelined session
//! transcript), `data/*` (DATA content scanning of 1 KiB, 100 KiB and 10 MiB bodies).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringmx::proto::data::{BareLinePolicy, Chunk, DataReader};
use ringmx::proto::line::frame;
use ringmx::proto::{Event, Session, SessionConfig, Settings, Stop, command};
use smtp_proto::Request;
use smtp_proto::request::receiver::{DataReceiver, RequestReceiver};

const EHLO: &[u8] = b"EHLO client.example.com\r\n";
const MAIL: &[u8] = b"MAIL FROM:<sender.name@example.com> SIZE=123456 BODY=8BITMIME\r\n";
const RCPT: &[u8] = b"RCPT TO:<recipient.name@example.org>\r\n";
const MIX: &[&[u8]] = &[
    EHLO,
    MAIL,
    RCPT,
    b"RCPT TO:<second@example.org> NOTIFY=SUCCESS,FAILURE\r\n",
    b"RCPT TO:<third+tag@sub.example.org>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"MAIL FROM:<> SMTPUTF8\r\n",
    b"QUIT\r\n",
];

fn ours(line: &[u8]) -> bool {
    matches!(
        command::parse_framed(line, 2048),
        command::Framed::Command(Ok(_), _)
    )
}

fn theirs(line: &[u8]) -> bool {
    Request::parse(&mut line.iter()).is_ok()
}

fn commands(c: &mut Criterion) {
    for (name, lines) in [
        ("ehlo", &[EHLO][..]),
        ("mail", &[MAIL][..]),
        ("rcpt", &[RCPT][..]),
        ("mix", MIX),
    ] {
        for l in lines {
            assert!(ours(l) && theirs(l), "both parsers accept {l:?}");
        }
        let mut g = c.benchmark_group(format!("command/{name}"));
        g.throughput(Throughput::Elements(lines.len() as u64));
        g.bench_function("ringmx", |b| {
            b.iter(|| {
                for l in lines {
                    black_box(ours(black_box(l)));
                }
            })
        });
        g.bench_function("smtp-proto", |b| {
            b.iter(|| {
                for l in lines {
                    black_box(theirs(black_box(l)));
                }
            })
        });
        g.bench_function("ringmx-frame-only", |b| {
            b.iter(|| {
                for l in lines {
                    black_box(frame(black_box(l), 2048));
                }
            })
        });
        g.finish();
    }
}

/// 76-byte CRLF lines with an occasional line that needs dot-stuffing, then the terminator.
fn body(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 128);
    let mut i = 0usize;
    while v.len() < size {
        if i % 50 == 49 {
            v.extend_from_slice(
                b"..a line that began with a dot and was stuffed by the client\r\n",
            );
        } else {
            let mut line = format!(
                "{i:08} The quick brown fox jumps over the lazy dog; pack my box with five dozen"
            );
            line.truncate(74);
            line.push_str("\r\n");
            v.extend_from_slice(line.as_bytes());
        }
        i += 1;
    }
    v.extend_from_slice(b".\r\n");
    v
}

fn ours_data(input: &[u8], policy: BareLinePolicy) -> usize {
    let mut r = DataReader::new(policy);
    let mut pos = 0;
    let mut total = 0;
    loop {
        let (used, chunk) = r.next(&input[pos..]);
        pos += used;
        match chunk {
            Chunk::Data(d) => total += black_box(d).len(),
            Chunk::End => return total,
            Chunk::NeedMore => unreachable!("body is complete"),
        }
    }
}

fn theirs_data(input: &[u8], buf: &mut Vec<u8>) -> usize {
    buf.clear();
    let mut r = DataReceiver::new();
    let mut iter = input.iter();
    assert!(r.ingest(&mut iter, buf));
    buf.len()
}

fn data(c: &mut Criterion) {
    for (name, size) in [
        ("1KiB", 1024),
        ("100KiB", 100 * 1024),
        ("10MiB", 10 * 1024 * 1024),
    ] {
        let input = body(size);
        let mut buf = Vec::with_capacity(input.len());
        // Both readers agree on the content length (smtp-proto keeps the final CRLF too).
        assert_eq!(
            ours_data(&input, BareLinePolicy::Reject),
            theirs_data(&input, &mut buf)
        );
        let mut g = c.benchmark_group(format!("data/{name}"));
        g.throughput(Throughput::Bytes(input.len() as u64));
        if size >= 1024 * 1024 {
            g.sample_size(20);
        }
        g.bench_function(BenchmarkId::new("ringmx", "reject"), |b| {
            b.iter(|| ours_data(black_box(&input), BareLinePolicy::Reject))
        });
        g.bench_function(BenchmarkId::new("ringmx", "normalize"), |b| {
            b.iter(|| ours_data(black_box(&input), BareLinePolicy::Normalize))
        });
        g.bench_function("smtp-proto", |b| {
            b.iter(|| theirs_data(black_box(&input), &mut buf))
        });
        g.finish();
    }
}

fn transcript(rcpts: usize) -> Vec<u8> {
    let mut t =
        b"EHLO client.example.com\r\nMAIL FROM:<sender@example.com> SIZE=2000 BODY=8BITMIME\r\n"
            .to_vec();
    for i in 0..rcpts {
        t.extend_from_slice(format!("RCPT TO:<user{i}@example.org>\r\n").as_bytes());
    }
    t.extend_from_slice(b"DATA\r\n");
    t.extend_from_slice(&body(1024));
    t.extend_from_slice(b"QUIT\r\n");
    t
}

fn ours_session(settings: &Arc<Settings>, input: &[u8], now: Instant) -> usize {
    let mut s = Session::new(settings.clone(), now);
    let mut feed = s.feed(input, now);
    let mut n = 0;
    loop {
        match feed.next() {
            Some(Event::Mail { .. } | Event::Rcpt { .. }) => feed.accept(),
            Some(Event::MessageEnd { .. }) => feed.accept_message("4xYz"),
            Some(ev) => n += black_box(matches!(ev, Event::Body(_))) as usize,
            None => match feed.stop() {
                Stop::Flush => {
                    n += feed.output().len();
                    feed.clear_output();
                }
                _ => break,
            },
        }
    }
    n
}

fn theirs_session(input: &[u8], buf: &mut Vec<u8>) -> usize {
    let mut rr = RequestReceiver::default();
    let mut iter = input.iter();
    let mut n = 0;
    loop {
        match rr.ingest(&mut iter) {
            Ok(Request::Data) => {
                buf.clear();
                let mut dr = DataReceiver::new();
                dr.ingest(&mut iter, buf);
                n += buf.len();
            }
            Ok(Request::Quit) => return n,
            Ok(r) => n += black_box(&r as *const _ as usize & 1),
            Err(_) => return n,
        }
    }
}

fn transaction(c: &mut Criterion) {
    let settings = Arc::new(
        Settings::new(SessionConfig {
            hostname: "mx.example.net".into(),
            ..SessionConfig::default()
        })
        .unwrap(),
    );
    let now = Instant::now();
    let mut buf = Vec::with_capacity(4096);
    let mut g = c.benchmark_group("transaction");
    for rcpts in [1usize, 10] {
        let input = transcript(rcpts);
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("ringmx", rcpts), |b| {
            b.iter(|| ours_session(&settings, black_box(&input), now))
        });
        g.bench_function(BenchmarkId::new("smtp-proto", rcpts), |b| {
            b.iter(|| theirs_session(black_box(&input), &mut buf))
        });
    }
    g.finish();
}

criterion_group!(benches, commands, transaction, data);
criterion_main!(benches);
