//! Finds where a chunked message body ends (RFC 9112, 7.1) without decoding it: the fast path
//! passes chunked bodies through byte for byte and only needs to know when one is complete.
//! The bytes come from backends, so every input is expected and a malformed one is an error,
//! never a panic.

/// The body is not valid chunked encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub(crate) struct Malformed;

/// Where the scanner is within a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Reading a chunk-size in hex; `digits` so far.
    Size { size: u64, digits: u8 },
    /// After the size: whitespace or extensions up to CR.
    Extension { size: u64 },
    /// The LF ending a chunk-size line.
    SizeLf { size: u64 },
    /// Chunk data still to come.
    Data(u64),
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line, up to its LF.
    TrailerLine,
    /// The LF of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::Size { size: 0, digits: 0 }
    }
}

impl Chunked {
    pub(crate) fn is_done(self) -> bool {
        self == Chunked::Done
    }

    /// Consumes bytes of the body from the start of `bytes`; returns how many belong to it
    /// (fewer than `bytes.len()` only when the body ended).
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<usize, Malformed> {
        let mut at = 0;
        while at < bytes.len() && !self.is_done() {
            if let Chunked::Data(left) = *self {
                let take = left.min((bytes.len() - at) as u64);
                at += take as usize;
                *self = if take == left {
                    Chunked::DataCr
                } else {
                    Chunked::Data(left - take)
                };
                continue;
            }
            *self = self.step(bytes[at])?;
            at += 1;
        }
        Ok(at)
    }

    /// Decodes from the start of `bytes`: consumes framing up to the next run of chunk data
    /// and that run; returns how many bytes were consumed and where the data is among them
    /// (empty when `bytes` held only framing, or the body ended).
    pub(crate) fn decode(
        &mut self,
        bytes: &[u8],
    ) -> Result<(usize, std::ops::Range<usize>), Malformed> {
        let mut at = 0;
        while at < bytes.len() && !self.is_done() {
            if let Chunked::Data(left) = *self {
                let take = left.min((bytes.len() - at) as u64) as usize;
                self.scan(&bytes[at..at + take])?;
                return Ok((at + take, at..at + take));
            }
            *self = self.step(bytes[at])?;
            at += 1;
        }
        Ok((at, at..at))
    }

    fn step(self, byte: u8) -> Result<Chunked, Malformed> {
        Ok(match (self, byte) {
            (Chunked::Size { size, digits }, _) if byte.is_ascii_hexdigit() => {
                if digits == 15 {
                    return Err(Malformed);
                }
                let digit = (byte as char).to_digit(16).unwrap_or(0) as u64;
                Chunked::Size {
                    size: size * 16 + digit,
                    digits: digits + 1,
                }
            }
            (Chunked::Size { digits: 0, .. }, _) => return Err(Malformed),
            (Chunked::Size { size, .. }, b';' | b' ' | b'\t') => Chunked::Extension { size },
            (Chunked::Size { size, .. } | Chunked::Extension { size }, b'\r') => {
                Chunked::SizeLf { size }
            }
            (Chunked::Extension { .. }, b'\n') => return Err(Malformed),
            (Chunked::Extension { size }, _) => Chunked::Extension { size },
            (Chunked::SizeLf { size }, b'\n') => size_lf(size),
            (Chunked::DataCr, b'\r') => Chunked::DataLf,
            (Chunked::DataLf, b'\n') => Chunked::default(),
            (Chunked::TrailerStart, b'\r') => Chunked::EndLf,
            (Chunked::TrailerStart | Chunked::TrailerLine, b'\n') => Chunked::TrailerStart,
            (Chunked::TrailerStart | Chunked::TrailerLine, _) => Chunked::TrailerLine,
            (Chunked::EndLf, b'\n') => Chunked::Done,
            _ => return Err(Malformed),
        })
    }
}

/// The state after a complete chunk-size line.
fn size_lf(size: u64) -> Chunked {
    if size == 0 {
        Chunked::TrailerStart
    } else {
        Chunked::Data(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `body` fed in pieces of `piece` bytes; returns the bytes that belonged to it.
    fn scan_in_pieces(body: &[u8], piece: usize) -> Result<Option<usize>, Malformed> {
        let mut scanner = Chunked::default();
        let mut total = 0;
        for part in body.chunks(piece) {
            total += scanner.scan(part)?;
            if scanner.is_done() {
                return Ok(Some(total));
            }
        }
        Ok(None)
    }

    #[test]
    fn finds_the_end_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: yes\r\n\r\n";
        for piece in 1..=body.len() {
            let mut with_next = body.to_vec();
            with_next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            assert_eq!(
                scan_in_pieces(&with_next, piece),
                Ok(Some(body.len())),
                "piece {piece}"
            );
        }
        assert_eq!(scan_in_pieces(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(
            scan_in_pieces(b"A \r\n0123456789\r\n0\r\n\r\n", 3),
            Ok(Some(21))
        );
    }

    /// Decodes `body` fed in pieces of `piece` bytes: the data, and whether it ended.
    fn decode_in_pieces(body: &[u8], piece: usize) -> Result<(Vec<u8>, bool), Malformed> {
        let mut decoder = Chunked::default();
        let mut data = Vec::new();
        for mut part in body.chunks(piece) {
            while !part.is_empty() && !decoder.is_done() {
                let (used, run) = decoder.decode(part)?;
                data.extend_from_slice(&part[run]);
                part = &part[used..];
            }
        }
        Ok((data, decoder.is_done()))
    }

    #[test]
    fn decodes_the_data_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: yes\r\n\r\n";
        for piece in 1..=body.len() {
            let (data, done) = decode_in_pieces(body, piece).unwrap();
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "piece {piece}");
            assert!(done, "piece {piece}");
        }
        assert_eq!(
            decode_in_pieces(b"5\r\nhel", 2),
            Ok((b"hel".to_vec(), false))
        );
        assert_eq!(decode_in_pieces(b"5\nhello", 1), Err(Malformed));
    }

    #[test]
    fn an_unfinished_body_is_not_done() {
        assert_eq!(scan_in_pieces(b"5\r\nhel", 2), Ok(None));
        assert_eq!(scan_in_pieces(b"5\r\nhello\r\n0\r\n", 2), Ok(None));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello",
            b"5\r\nhelloX",
            b"ffffffffffffffff\r\n",
            b"5;ext\n",
            b"0\r\n\r\r",
        ] {
            assert_eq!(scan_in_pieces(bad, 1), Err(Malformed), "{bad:?}");
        }
    }

    /// Seeded fuzz: random chunked bodies are found whole, and random bytes never panic.
    #[test]
    fn fuzz_random_bodies_and_garbage() {
        let mut next = crate::tests::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..2000 {
            let mut body = Vec::new();
            let mut data = Vec::new();
            for _ in 0..next() % 5 {
                let size = (next() % 300) as usize + 1;
                body.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                let chunk: Vec<u8> = (0..size).map(|_| next() as u8).collect();
                body.extend_from_slice(&chunk);
                data.extend_from_slice(&chunk);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let piece = (next() % 64) as usize + 1;
            assert_eq!(scan_in_pieces(&body, piece), Ok(Some(body.len())));
            let (decoded, done) = decode_in_pieces(&body, piece).unwrap();
            assert!(
                done && decoded == data,
                "decoded whole in pieces of {piece}"
            );
            let garbage: Vec<u8> = (0..next() % 200).map(|_| next() as u8).collect();
            let _ = scan_in_pieces(&garbage, piece);
            let _ = decode_in_pieces(&garbage, piece);
        }
    }
}
