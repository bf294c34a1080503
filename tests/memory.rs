//! Content is streamed, not held: large messages through DATA and BDAT arrive intact (drop
//! folder, next hop, after `kill -9`), a session keeps at most 128 KiB of content in memory,
//! and many large unfinished transfers at once barely move the server's RSS. Both drivers.

mod support;

use std::io::Write as _;
use std::net::TcpStream;
use std::time::Duration;

use support::{Raw, Server, Sink, temp_dir};

const DRIVERS: [&str; 2] = ["auto", "legacy"];

/// A message of about `size` bytes: headers (with a forged verdict header), then numbered
/// lines, some starting with a dot.
fn big_message(id: &str, size: usize) -> Vec<u8> {
    let mut m =
        format!("Message-ID: <{id}@test>\r\nX-ASWL: pass mode=global\r\nSubject: big {id}\r\n\r\n")
            .into_bytes();
    let mut i = 0u64;
    while m.len() < size {
        m.extend_from_slice(format!(".{i:08} {}\r\n", "y".repeat(60)).as_bytes());
        i += 1;
    }
    m
}

fn dot_stuffed(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + m.len() / 32);
    for line in m.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn open_txn(c: &mut Raw, to: &str) {
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO big.test\r\n").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@big.test>\r\n").starts_with("250"));
    let r = c.cmd(&format!("RCPT TO:<{to}>\r\n"));
    assert!(r.starts_with("250"), "{r}");
}

fn send_data(addr: std::net::SocketAddr, to: &str, m: &[u8]) -> String {
    let mut c = Raw::connect(addr);
    open_txn(&mut c, to);
    assert!(c.cmd("DATA\r\n").starts_with("354"));
    c.w.write_all(&dot_stuffed(m)).unwrap();
    let r = c.reply();
    c.cmd("QUIT\r\n");
    r
}

fn send_bdat(addr: std::net::SocketAddr, to: &str, m: &[u8]) -> String {
    let mut c = Raw::connect(addr);
    open_txn(&mut c, to);
    let (a, b) = m.split_at(m.len() / 3);
    c.w.write_all(format!("BDAT {}\r\n", a.len()).as_bytes())
        .unwrap();
    c.w.write_all(a).unwrap();
    assert!(c.reply().starts_with("250"));
    c.w.write_all(format!("BDAT {} LAST\r\n", b.len()).as_bytes())
        .unwrap();
    c.w.write_all(b).unwrap();
    let r = c.reply();
    c.cmd("QUIT\r\n");
    r
}

/// What a stored copy must hold: the message without the forged verdict header.
fn without_forged_verdict(m: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(m);
    text.replacen("X-ASWL: pass mode=global\r\n", "", 1)
        .into_bytes()
}

#[test]
fn large_messages_are_streamed_intact_through_data_and_bdat() {
    for driver in DRIVERS {
        let dir = temp_dir(&format!("memory-sink-{driver}"));
        std::fs::create_dir_all(&dir).unwrap();
        let sink = Sink::start(&dir, &[]);
        let (later_socket, later) = support::refusing_port();
        let extra = format!(
            "[authentication]\nverify = false\n[aswl]\nmode = \"per-recipient\"\n[[route]]\ndomains = [\"relay.test\"]\naction = \"relay\"\nnext_hops = [\"127.0.0.1:{}\"]\n[[route]]\ndomains = [\"later.test\"]\naction = \"relay\"\nnext_hops = [\"127.0.0.1:{later}\"]\n",
            sink.port
        );
        let mut s = Server::start_with(&format!("memory-big-{driver}"), driver, "", &extra);
        let m1 = big_message("data", 5 << 20);
        let m2 = big_message("bdat", 3 << 20);
        assert!(send_data(s.inbound, "u@example.test", &m1).starts_with("250"));
        assert!(send_bdat(s.inbound, "u@example.test", &m2).starts_with("250"));
        let dropped = s.dropped();
        assert_eq!(dropped.len(), 2, "{driver}");
        for (m, id) in [(&m1, "data"), (&m2, "bdat")] {
            let want = String::from_utf8(without_forged_verdict(m)).unwrap();
            let got = dropped
                .iter()
                .find(|d| d.contains(&format!("<{id}@test>")))
                .unwrap();
            assert!(got.ends_with(&want), "{driver} {id}: content changed");
            assert!(got.contains("X-ASWL: none mode=per-recipient\r\n"));
            assert_eq!(got.matches("X-ASWL:").count(), 1, "{driver}");
        }
        // Relayed: read back from the spool, dot-stuffed on the way out.
        let m3 = String::from_utf8(big_message("relay", 4 << 20)).unwrap();
        assert!(send_data(s.outbound, "v@relay.test", m3.as_bytes()).starts_with("250"));
        let got = sink.wait_for(1, 30);
        assert_eq!(got.len(), 1, "{}", s.log());
        assert!(got[0]["data"].as_str().unwrap().ends_with(&m3), "{driver}");
        // Acknowledged while its next hop is down, then kill -9: recovered from the spool and
        // delivered whole once the hop is up.
        let m4 = String::from_utf8(big_message("crash", 2 << 20)).unwrap();
        assert!(send_data(s.outbound, "w@later.test", m4.as_bytes()).starts_with("250"));
        s.kill9();
        drop(later_socket);
        let sink2 = Sink::start_on(&dir, later, &[]);
        s.restart();
        let got = sink2.wait_for(1, 30);
        assert_eq!(got.len(), 1, "{driver}: not recovered: {}", s.log());
        assert!(got[0]["data"].as_str().unwrap().ends_with(&m4), "{driver}");
    }
}

#[test]
fn header_section_beyond_what_is_kept_in_memory_is_refused() {
    let s = Server::start("memory-header", "auto");
    let mut m = String::from("Subject: long\r\n");
    while m.len() < 200 * 1024 {
        m.push_str("X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    m.push_str("X-ASWL: pass\r\n\r\nbody\r\n");
    let r = send_data(s.inbound, "u@example.test", m.as_bytes());
    assert!(
        r.starts_with("552 5.3.4 Message header section exceeds"),
        "{r}"
    );
    assert!(s.dropped().is_empty());
}

fn rss_kib(s: &Server) -> u64 {
    let pid = s.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 40 transfers of 4 MiB each, all unfinished at once: the server holds about 128 KiB of
/// content per session, not the 160 MiB it has read.
#[test]
fn unfinished_large_transfers_do_not_grow_memory() {
    for driver in DRIVERS {
        let s = Server::start(&format!("memory-rss-{driver}"), driver);
        let before = rss_kib(&s);
        let chunk = vec![b'z'; 64 * 1024];
        let mut open: Vec<TcpStream> = Vec::new();
        for _ in 0..40 {
            let mut c = Raw::connect(s.inbound);
            open_txn(&mut c, "u@example.test");
            assert!(c.cmd("DATA\r\n").starts_with("354"));
            c.w.write_all(b"Subject: slow\r\n\r\n").unwrap();
            for _ in 0..64 {
                c.w.write_all(&chunk).unwrap();
                c.w.write_all(b"\r\n").unwrap();
            }
            open.push(c.w);
        }
        // Let the server read what the kernel still buffers.
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kib(&s);
        let grown = after.saturating_sub(before);
        assert!(
            grown < 32 * 1024,
            "{driver}: RSS grew {grown} KiB ({before} -> {after}) for 40 unfinished 4 MiB transfers"
        );
        drop(open);
    }
}

/// 100 accepted 1 MiB messages for a next hop that accepts connections and never answers: the
/// queue keeps none of them in memory beyond a small per-core budget (content is read back from
/// the spool for the attempts in flight, and only up to a read budget).
#[test]
fn queued_large_messages_for_a_silent_hop_do_not_grow_memory() {
    for driver in DRIVERS {
        // Never accepted, never answered: connections complete in the backlog and hang.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let route = format!(
            "[[route]]\ndomains = [\"silent.test\"]\naction = \"relay\"\nnext_hops = [\"{}\"]\n",
            silent.local_addr().unwrap()
        );
        let s = Server::start_with(&format!("memory-queue-{driver}"), driver, "", &route);
        let before = rss_kib(&s);
        let mut c = Raw::connect(s.outbound);
        assert!(c.reply().starts_with("220"));
        assert!(c.cmd("EHLO big.test\r\n").starts_with("250"));
        let body = big_message("queued", 1 << 20);
        let payload = dot_stuffed(&body);
        for i in 0..100 {
            assert!(c.cmd("MAIL FROM:<a@big.test>\r\n").starts_with("250"));
            assert!(
                c.cmd(&format!("RCPT TO:<r{i}@silent.test>\r\n"))
                    .starts_with("250")
            );
            assert!(c.cmd("DATA\r\n").starts_with("354"));
            c.w.write_all(&payload).unwrap();
            let r = c.reply();
            assert!(r.starts_with("250"), "{driver} {i}: {r}");
        }
        c.cmd("QUIT\r\n");
        std::thread::sleep(Duration::from_millis(500));
        let grown = rss_kib(&s).saturating_sub(before);
        assert!(
            grown < 40 * 1024,
            "{driver}: RSS grew {grown} KiB with 100 MiB queued for a silent hop"
        );
        drop(silent);
    }
}

/// A message that has grown past `max_message_size` gives its spill file back at once: a
/// client that goes on sending it (or trickles it) holds no share of `max_staging`, and the
/// message is refused with `552` at its end.
#[test]
fn a_message_too_big_holds_no_staging() {
    let s = Server::start_with(
        "memory-doomed",
        "auto",
        "[binding.limits]\nmax_message_size = \"1MiB\"\n",
        "[spool]\nmax_staging = \"1536KiB\"\n",
    );
    let payload = dot_stuffed(&big_message("doomed", 1200 << 10));
    let (head, tail) = payload.split_at(payload.len() - 3);
    let mut a = Raw::connect(s.inbound);
    open_txn(&mut a, "u@example.test");
    assert!(a.cmd("DATA\r\n").starts_with("354"));
    a.w.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Another, while the first is still being sent: had the first kept its 1 MiB, this one's
    // 0.8 MiB would not fit.
    let r = send_data(s.inbound, "u@example.test", &big_message("fits", 900 << 10));
    assert!(r.starts_with("250"), "{r}");
    a.w.write_all(tail).unwrap();
    assert!(a.reply().starts_with("552"));
}

/// `[spool] max_staging`: spill files of all sessions together stay within it. A transfer that
/// would go beyond is refused at its end with `452 4.3.1` while the others complete, and once
/// they are done the space is there again.
#[test]
fn staging_disk_is_bounded_across_sessions() {
    let s = Server::start_with(
        "memory-staging",
        "auto",
        "",
        "[spool]\nmax_staging = \"2MiB\"\n",
    );
    let body = big_message("stage", 1536 << 10);
    let payload = dot_stuffed(&body);
    let (head, tail) = payload.split_at(payload.len() - 3);
    let mut a = Raw::connect(s.inbound);
    open_txn(&mut a, "u@example.test");
    assert!(a.cmd("DATA\r\n").starts_with("354"));
    a.w.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A second one while the first holds 1.4 MiB of the 2 MiB.
    let r = send_data(s.inbound, "u@example.test", &body);
    assert!(r.starts_with("452 4.3.1"), "{r}");
    a.w.write_all(tail).unwrap();
    assert!(a.reply().starts_with("250"));
    a.cmd("QUIT\r\n");
    // Space is back.
    assert!(send_data(s.inbound, "u@example.test", &body).starts_with("250"));
    assert_eq!(s.dropped().len(), 2);
}
