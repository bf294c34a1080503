use super::*;
use std::time::SystemTime;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ringmx-spool-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn env(id: &str, rcpts: usize) -> Envelope {
    let rcpts: Vec<String> = (0..rcpts).map(|i| format!("r{i}@d.test")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    Envelope {
        received_at: SystemTime::now(),
        aswl: None,
        ..Envelope::example(id, &rcpts)
    }
}

fn spool(d: &Path, segment_size: u64) -> CoreSpool {
    let opts = SpoolOptions {
        dir: d.to_path_buf(),
        staging: Arc::new(staging::Budget::new(1 << 30)),
        segment_size,
        commit_batch: 4,
        commit_delay: Duration::from_micros(200),
    };
    CoreSpool::new(0, opts, Arc::new(AtomicU64::new(1)), Arc::default()).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn stored_messages_are_recovered_until_finished() {
    let d = dir("recover");
    let s = spool(&d, 1 << 20);
    let (a, b) = block_on(async {
        let a = s
            .store(&env("A", 2), "T: a\r\n", b"body a\r\n", None)
            .await
            .unwrap();
        let b = s
            .store(&env("B", 1), "T: b\r\n", b"body b\r\n", None)
            .await
            .unwrap();
        (a, b)
    });
    assert_eq!(
        a.seg.read_at(a.content_at, a.content_len).unwrap(),
        b"body a\r\n"
    );
    // A: recipient 0 delivered; B: finished.
    super::finish(&a.seg, "A", &[0], false);
    super::finish(&b.seg, "B", &[0], true);
    drop(s);
    let r = recover(&d).unwrap();
    assert_eq!(r.messages.len(), 1);
    let m = &r.messages[0];
    assert_eq!(m.record.env.queue_id, "A");
    assert_eq!(m.pending, vec![1]);
    assert_eq!(m.record.trace, "T: a\r\n");
    assert_eq!(
        m.seg
            .read_at(m.record.content_at, m.record.content_len)
            .unwrap(),
        b"body a\r\n"
    );
    // Finishing the last message deletes the (no longer current) segment.
    super::finish(&m.seg, "A", &[1], true);
    assert!(!m.seg.path.exists());
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn torn_tail_and_corrupt_ranges_are_skipped() {
    let d = dir("torn");
    let s = spool(&d, 1 << 20);
    let seg = block_on(async {
        for i in 0..3 {
            s.store(&env(&format!("M{i}"), 1), "", b"x\r\n", None)
                .await
                .unwrap();
        }
        s.segment().unwrap()
    });
    drop(s);
    let mut bytes = fs::read(&seg.path).unwrap();
    let one = bytes.len() / 3;
    // Corrupt the middle record's checksum and tear the last one.
    bytes[one + 13] ^= 0xff;
    bytes.truncate(bytes.len() - 2);
    fs::write(&seg.path, &bytes).unwrap();
    let r = recover(&d).unwrap();
    let ids: Vec<_> = r
        .messages
        .iter()
        .map(|m| m.record.env.queue_id.as_str())
        .collect();
    assert_eq!(ids, ["M0"]);
    assert!(r.corrupt_ranges >= 2);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn segments_roll_over_and_finished_ones_are_deleted() {
    let d = dir("roll");
    let s = spool(&d, 64);
    let stored = block_on(async {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(
                s.store(&env(&format!("M{i}"), 1), "", b"xx\r\n", None)
                    .await
                    .unwrap(),
            );
        }
        v
    });
    let segs: HashSet<u64> = stored.iter().map(|s| s.seg.id).collect();
    assert_eq!(
        segs.len(),
        4,
        "each record exceeds 64 bytes, so each gets a segment"
    );
    for (i, st) in stored.iter().enumerate().take(3) {
        super::finish(&st.seg, &format!("M{i}"), &[0], true);
        assert!(!st.seg.path.exists());
    }
    // The current segment stays while it is current.
    super::finish(&stored[3].seg, "M3", &[0], true);
    assert!(stored[3].seg.path.exists());
    drop(s);
    let r = recover(&d).unwrap();
    assert!(r.messages.is_empty());
    assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
    fs::remove_dir_all(&d).unwrap();
}

/// A client can put a complete, valid record inside its message (BINARYMIME allows any
/// bytes). When that message's record is damaged (a hole left by a failed copy, a flipped
/// byte) or torn (a crash mid-append), recovery skips it by its checked header and never finds
/// the record inside: no forged envelope is ever queued. Records after a damaged one are.
#[test]
fn records_hidden_in_content_are_never_recovered() {
    let mut forged = record::encode_message(&env("EVIL", 1), "", b"evil\r\n");
    forged.extend_from_slice(b"evil\r\n");
    let mut content = b"Subject: innocent\r\n\r\n".to_vec();
    content.extend_from_slice(&forged);
    content.extend_from_slice(&[b'z'; 64]);
    for damage in ["flip", "tear"] {
        let d = dir(&format!("forged-{damage}"));
        let s = spool(&d, 1 << 20);
        let (seg, m1) = block_on(async {
            s.store(&env("M0", 1), "", b"x\r\n", None).await.unwrap();
            let m1 = s.store(&env("M1", 1), "", &content, None).await.unwrap();
            s.store(&env("M2", 1), "", b"y\r\n", None).await.unwrap();
            (s.segment().unwrap(), m1)
        });
        drop(s);
        let mut bytes = fs::read(&seg.path).unwrap();
        let at = m1.content_at as usize;
        match damage {
            // A byte of M1's own content, after the forged record.
            "flip" => bytes[at + content.len() - 1] ^= 0xff,
            // Cut inside M1's content, after the forged record.
            _ => bytes.truncate(at + content.len() - 10),
        }
        fs::write(&seg.path, &bytes).unwrap();
        let r = recover(&d).unwrap();
        let ids: Vec<_> = r
            .messages
            .iter()
            .map(|m| m.record.env.queue_id.as_str())
            .collect();
        let expect: &[&str] = if damage == "flip" {
            &["M0", "M2"]
        } else {
            &["M0"]
        };
        assert_eq!(ids, expect, "{damage}");
        fs::remove_dir_all(&d).unwrap();
    }
}
