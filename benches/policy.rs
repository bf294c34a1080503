//! The gatekeeper's per-command costs: `cargo bench --bench policy`.
//!
//! - `recipients/load_1m`: parse a `[[recipients]]` file of 1 M addresses (floor: ≤ 2 s);
//! - `recipients/lookup_*`: one RCPT checked against that map (floor: ≤ 200 ns);
//! - `rates/take`: one rate-limit bucket update (floor: ≤ 200 ns);
//! - `greet/recall`: the greeting test's memory, looked up at connect.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ringmx::config::RatesSection;
use ringmx::policy::greet::Memory;
use ringmx::policy::rates::{Event, Rates};
use ringmx::policy::recipients::{RecipientMap, RecipientMaps};

const ENTRIES: usize = 1_000_000;

fn map_text() -> String {
    let mut s = String::with_capacity(ENTRIES * 28);
    s.push_str("# generated\n*@catchall.example\npostmaster@*\n");
    for i in 0..ENTRIES {
        s.push_str(&format!("user{i:07}@example.com\n"));
    }
    s
}

fn benches(c: &mut Criterion) {
    let text = map_text();
    let mut g = c.benchmark_group("recipients");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("load_1m", |b| {
        b.iter(|| RecipientMap::parse(black_box(&text)).unwrap())
    });
    g.finish();
    let map = RecipientMap::parse(&text).unwrap();
    assert!(map.len() >= ENTRIES);
    let maps = RecipientMaps::new(vec![(
        vec!["example.com".into(), "catchall.example".into()],
        Some(map),
    )]);
    for (name, address) in [
        ("lookup_known", "user0512345@example.com"),
        ("lookup_tagged", "User0512345+news@Example.com"),
        ("lookup_unknown", "nobody@example.com"),
        ("lookup_domain_pattern", "anyone@catchall.example"),
    ] {
        c.bench_function(&format!("recipients/{name}"), |b| {
            b.iter(|| maps.lookup(black_box(address)))
        });
    }

    let rates = Rates::new(&RatesSection {
        recipients_per_minute: 1_000_000,
        ..RatesSection::default()
    })
    .unwrap();
    let mut i = 0u32;
    let mut now = 0u64;
    c.bench_function("rates/take", |b| {
        b.iter(|| {
            // A few thousand networks, the clock moving: the cells stay far from the limit.
            i = i.wrapping_add(1);
            now += 1;
            let ip = IpAddr::from((0x0a00_0000 | (i & 0xfff)).to_be_bytes());
            rates.take(Event::Recipient, black_box(ip), now)
        })
    });

    let memory = Memory::new(1 << 17);
    for k in 0..10_000u32 {
        memory.remember(IpAddr::from(k.to_be_bytes()), k % 2 == 0, 1 << 40);
    }
    c.bench_function("greet/recall", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            memory.recall(black_box(IpAddr::from((i % 20_000).to_be_bytes())), 1000)
        })
    });
}

criterion_group!(policy, benches);
criterion_main!(policy);
