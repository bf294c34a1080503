//! The whitelist's code paths: `cargo bench --bench aswl`.
//!
//! Groups: `normalize` (address keys), `classify` (collection: headers, RFC 2047 subject, the
//! shipped out-of-office masks), `check/*` (one recipient, per mode, against 1 M records),
//! `record` (one collection written to the store). The 10 M-record scale run with a concurrent
//! writer is `benches/aswl_scale.rs`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ringmx::aswl::addr::Normalize;
use ringmx::aswl::detect::{self, Masks, Signals};
use ringmx::aswl::{Aswl, Mode};
use ringmx::config::Config;

fn settings(dir: &std::path::Path) -> ringmx::aswl::Settings {
    let src = format!(
        "[server]\ndata_dir = \"{}\"\n[[binding]]\nname = \"in\"\nlisten = \"127.0.0.1:2525\"\ndirection = \"inbound\"\n[domains]\nlocal = [\"corp.example\"]\n[[route]]\ndomains = [\"*\"]\naction = \"discard\"\n[authentication]\nverify = false\n[aswl]\n",
        dir.display()
    );
    (*Config::parse(&src, "bench").unwrap().aswl.unwrap()).clone()
}

fn benches(c: &mut Criterion) {
    let n = Normalize::default();
    c.bench_function("normalize/external", |b| {
        b.iter(|| n.external(black_box("Jane.Doe+news@Partner-Company.Example")))
    });
    c.bench_function("normalize/idn", |b| {
        b.iter(|| n.external(black_box("jane@bücher.example")))
    });
    let masks = Masks::new(&detect::DEFAULT_SUBJECTS.lines().collect::<Vec<_>>(), false).unwrap();
    let signals = Signals {
        auto_submitted: true,
        precedence: true,
        list_headers: true,
        reports: true,
    };
    let msg = b"From: John <john@corp.example>\r\nTo: jane@partner.example\r\nSubject: =?UTF-8?Q?Re:_Angebot_f=C3=BCr_Q3?=\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <a@b>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n";
    c.bench_function("classify/ordinary", |b| {
        b.iter(|| detect::classify(black_box(msg), signals, Some(&masks)))
    });

    let dir = std::env::temp_dir().join(format!("ringmx-aswl-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut s = settings(&dir);
    let a = Aswl::open(&s, 1).unwrap();
    for i in 0..1_000_000u64 {
        let l = format!("user{}@corp.example", i % 5_000);
        let x = format!("contact{i}@partner{}.example", i % 10_000);
        a.store.record((&l, &l), (&x, &x), 1_000);
    }
    // 4,096 recorded (sender, recipient) pairs spread over the million, built beforehand.
    let queries: Vec<(String, String)> = (0..4096u64)
        .map(|j| {
            let i = (j * 7919) % 1_000_000;
            (
                format!("contact{i}@partner{}.example", i % 10_000),
                format!("user{}@corp.example", i % 5_000),
            )
        })
        .collect();
    for mode in [Mode::Global, Mode::PerDomain, Mode::PerRecipient] {
        s.mode = mode;
        let mut i = 0usize;
        c.bench_function(&format!("check/{}", mode.as_str()), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                let (sender, rcpt) = &queries[i];
                a.check(&s, black_box(sender), black_box(rcpt), 2_000)
            })
        });
    }
    let mut i = 0u64;
    c.bench_function("record", |b| {
        b.iter(|| {
            i += 1;
            let x = format!("new{i}@fresh.example");
            a.store.record(("user1@corp.example", ""), (&x, ""), 3_000)
        })
    });
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(aswl, benches);
criterion_main!(aswl);
