//! Plain TCP or TLS over monoio's owned-buffer I/O. TLS uses rustls's own sans-IO connection:
//! ciphertext is read into an owned buffer and fed to rustls, plaintext comes out into the
//! session's input buffer; no adaptor crate, no extra copy layer.

use std::io::{self, Read, Write};
use std::sync::Arc;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

const CIPHER_READ: usize = 8192;

/// The most [`Transport::write_all_within`] hands the socket at once.
const SEND_PIECE: usize = 256 << 10;

pub enum Transport {
    Plain,
    Tls(Box<Tls>),
}

pub struct Tls {
    pub conn: rustls::Connection,
    cipher: Vec<u8>,
}

impl Transport {
    pub fn tls(config: Arc<rustls::ServerConfig>) -> io::Result<Transport> {
        let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Transport::Tls(Box::new(Tls {
            conn: conn.into(),
            cipher: Vec::new(),
        })))
    }

    /// The client side, towards a next hop called `name`.
    pub fn tls_client(config: Arc<rustls::ClientConfig>, name: &str) -> io::Result<Transport> {
        let name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        Ok(Transport::Tls(Box::new(Tls {
            conn: conn.into(),
            cipher: Vec::new(),
        })))
    }

    /// Hand rustls ciphertext that was read before TLS started (bytes after a PROXY header
    /// on an implicit-TLS binding).
    pub fn feed_ciphertext(&mut self, mut data: &[u8]) -> io::Result<()> {
        let Transport::Tls(t) = self else {
            return Ok(());
        };
        while !data.is_empty() {
            t.conn.read_tls(&mut data)?;
            t.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        Ok(())
    }

    pub fn tls_description(&self) -> Option<String> {
        match self {
            Transport::Plain => None,
            Transport::Tls(t) => Some(crate::tls::describe(&t.conn)),
        }
    }

    /// Append what arrives to `buf`; Ok(0) is the end of the stream (or TLS close_notify).
    pub async fn read(
        &mut self,
        stream: &mut TcpStream,
        buf: Vec<u8>,
        chunk: usize,
    ) -> (io::Result<usize>, Vec<u8>) {
        match self {
            Transport::Plain => {
                let mut buf = buf;
                if buf.capacity() - buf.len() < chunk / 2 {
                    buf.reserve(chunk);
                }
                let len = buf.len();
                let (res, slice) = stream.read(buf.slice_mut(len..)).await;
                (res, slice.into_inner())
            }
            Transport::Tls(t) => t.read(stream, buf, chunk).await,
        }
    }

    /// Write all of `data`, or fail with `TimedOut` when the peer takes no piece of it (at
    /// most [`SEND_PIECE`] bytes) within `stall`: a peer that stops reading cannot hold the
    /// writer for ever, however big `data` is (the relay's side).
    pub async fn write_all_within(
        &mut self,
        stream: &mut TcpStream,
        data: Vec<u8>,
        stall: std::time::Duration,
    ) -> io::Result<()> {
        if data.len() <= SEND_PIECE {
            return match monoio::time::timeout(stall, self.write_all(stream, data)).await {
                Ok((res, _)) => res,
                Err(_) => Err(io::ErrorKind::TimedOut.into()),
            };
        }
        for piece in data.chunks(SEND_PIECE) {
            match monoio::time::timeout(stall, self.write_all(stream, piece.to_vec())).await {
                Ok((res, _)) => res?,
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
        Ok(())
    }

    pub async fn write_all(
        &mut self,
        stream: &mut TcpStream,
        data: Vec<u8>,
    ) -> (io::Result<()>, Vec<u8>) {
        match self {
            Transport::Plain => {
                let (res, buf) = stream.write_all(data).await;
                (res.map(|_| ()), buf)
            }
            Transport::Tls(t) => {
                // rustls takes what fits in its buffer of records (64 KiB): write that out,
                // then the next part.
                // Nothing taken even with its buffer written out: the connection is closing.
                let mut rest = data.as_slice();
                let mut took_nothing = false;
                let res = loop {
                    let n = match t.conn.writer().write(rest) {
                        Ok(n) => n,
                        Err(e) => break Err(e),
                    };
                    rest = rest.get(n..).unwrap_or_default();
                    if let Err(e) = t.flush(stream).await {
                        break Err(e);
                    }
                    if rest.is_empty() {
                        break Ok(());
                    }
                    if n == 0 && took_nothing {
                        break Err(io::ErrorKind::WriteZero.into());
                    }
                    took_nothing = n == 0;
                };
                (res, data)
            }
        }
    }

    /// Read until `buf` holds one complete SMTP reply and take it out (the client side: relay
    /// and load generator). Malformed replies are `InvalidData`, a closed peer `UnexpectedEof`.
    pub async fn read_reply(
        &mut self,
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
    ) -> io::Result<crate::relay::reply::Reply> {
        loop {
            match crate::relay::reply::parse(buf) {
                Ok(Some((r, n))) => {
                    buf.drain(..n);
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed reply ({e:?})"),
                    ));
                }
            }
            let (res, b) = self.read(stream, std::mem::take(buf), 4096).await;
            *buf = b;
            if res? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Run the TLS handshake to completion (no-op for plain).
    pub async fn handshake(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        let Transport::Tls(t) = self else {
            return Ok(());
        };
        while t.conn.is_handshaking() {
            t.flush(stream).await?;
            if t.conn.wants_read() {
                t.read_cipher(stream).await?;
            }
        }
        t.flush(stream).await
    }
}

impl Transport {
    /// The TLS handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        matches!(self, Transport::Tls(t)
            if t.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
    }
}

impl Tls {
    async fn flush(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut out = std::mem::take(&mut self.cipher);
            out.clear();
            self.conn.write_tls(&mut out)?;
            let (res, out) = stream.write_all(out).await;
            self.cipher = out;
            res?;
        }
        Ok(())
    }

    /// Read one batch of ciphertext and process it. Err(UnexpectedEof) when the peer closed.
    async fn read_cipher(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.cipher);
        buf.clear();
        buf.reserve(CIPHER_READ);
        let (res, b) = stream.read(buf).await;
        buf = b;
        let n = res?;
        if n == 0 {
            self.cipher = buf;
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut rd = buf.get(..n).unwrap_or_default();
        while !rd.is_empty() {
            self.conn.read_tls(&mut rd)?;
            if let Err(e) = self.conn.process_new_packets() {
                // Send the alert rustls prepared, then fail.
                let _ = self.flush(stream).await;
                self.cipher = buf;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        self.cipher = buf;
        Ok(())
    }

    async fn read(
        &mut self,
        stream: &mut TcpStream,
        mut buf: Vec<u8>,
        chunk: usize,
    ) -> (io::Result<usize>, Vec<u8>) {
        loop {
            let len = buf.len();
            buf.resize(len + chunk, 0);
            let got = self
                .conn
                .reader()
                .read(buf.get_mut(len..).unwrap_or_default());
            match got {
                Ok(n) => {
                    buf.truncate(len + n);
                    return (Ok(n), buf); // n == 0: close_notify, a clean end
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.truncate(len),
                Err(e) => {
                    buf.truncate(len);
                    return (Err(e), buf);
                }
            }
            if let Err(e) = self.flush(stream).await {
                return (Err(e), buf);
            }
            match self.read_cipher(stream).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            }
        }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Plain => f.write_str("Plain"),
            Transport::Tls(_) => f.write_str("Tls"),
        }
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}
