//! The drop (pickup) folder: one `.eml` file per message, made durable before the 250.
//!
//! File format (as IIS's pickup directory, so existing pickup services read it):
//! ```text
//! X-Sender: <reverse-path, empty for the null sender>
//! X-Receiver: <recipient>          (one line per recipient)
//! Received: …                      (our trace header)
//! <the message as received>
//! ```
//! Writing: `.QUEUEID.tmp` → write → fdatasync → rename to `QUEUEID.eml` → fsync the folder.
//! A crash leaves at most a `.tmp` file, never a partial `.eml`; the recovered message's next
//! attempt overwrites its own leftover (the name holds its queue id), so a crash delays nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::Envelope;

/// Write one message into `folder`; returns the final path once it is durable.
pub fn write(
    folder: &Path,
    env: &Envelope,
    rcpts: &[String],
    received: &str,
    content: &[u8],
) -> io::Result<PathBuf> {
    fs::create_dir_all(folder)?;
    let tmp = folder.join(format!(".{}.tmp", env.queue_id));
    let path = folder.join(format!("{}.eml", env.queue_id));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let mut head = format!("X-Sender: {}\r\n", env.mail_from);
        for r in rcpts {
            head.push_str(&format!("X-Receiver: {r}\r\n"));
        }
        head.push_str(received);
        f.write_all(head.as_bytes())?;
        f.write_all(content)?;
        f.sync_data()?;
        fs::rename(&tmp, &path)?;
        File::open(folder)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(path)
}

/// Whether an I/O error means "out of space" (452 4.3.1) rather than another failure (451).
/// Whether content declared BINARYMIME can be written as a text file for a pickup service
/// (which resends it with DATA): no NUL, and every CR and LF in a CRLF pair. Mail from
/// Exchange, which declares BINARYMIME for text, passes; content with bare line ends, whose
/// lines a next hop would split its own way, does not.
pub fn binary_is_text(content: &[u8]) -> bool {
    let mut at = 0;
    while let Some(i) = memchr::memchr3(b'\0', b'\r', b'\n', content.get(at..).unwrap_or_default())
    {
        let i = at + i;
        match content.get(i) {
            Some(b'\r') if content.get(i + 1) == Some(&b'\n') => at = i + 2,
            _ => return false,
        }
    }
    true
}

pub fn is_storage_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_content_that_is_text() {
        for (content, text) in [
            (&b""[..], true),
            (b"Subject: x\r\n\r\nbody\r\n", true),
            (b"\xff\xfe 8-bit bytes\r\n", true),
            (b"a\nb\r\n", false),
            (b"a\rb\r\n", false),
            (b"a\r\n\nb", false),
            (b"a\r\r\n", false),
            (b"ends in CR\r", false),
            (b"\nstarts with LF", false),
            (b"a\0b\r\n", false),
            (b"line\r\n.\nMAIL FROM:<x@y.test>\r\n", false),
        ] {
            assert_eq!(
                binary_is_text(content),
                text,
                "{:?}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn writes_envelope_trace_and_content() {
        let dir = std::env::temp_dir().join(format!("ringmx-drop-{}", std::process::id()));
        // A longer leftover of a write cut short by a crash is replaced, not a blocker.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".ABC.tmp"), vec![b'x'; 4096]).unwrap();
        let env = Envelope {
            mail_from: String::new(),
            ..Envelope::example("ABC", &["x@d.test", "y@d.test"])
        };
        let p = write(
            &dir,
            &env,
            &env.rcpts,
            "Received: x\r\n",
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "X-Sender: \r\nX-Receiver: x@d.test\r\nX-Receiver: y@d.test\r\nReceived: x\r\nSubject: s\r\n\r\nhi\r\n"
        );
        assert!(!dir.join(".ABC.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
