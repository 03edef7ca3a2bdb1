//! Reading RESP2 replies as bytes: where a reply ends, and the header of each value.

/// Finds where the first RESP2 reply in a buffer ends, resuming where the last call stopped
/// as more bytes arrive.
#[derive(Debug)]
pub struct ReplyScan {
    /// Where the next value starts.
    position: usize,
    /// Values still to be read before the reply is whole (an array of n adds n).
    remaining: u64,
}

impl Default for ReplyScan {
    fn default() -> Self {
        ReplyScan {
            position: 0,
            remaining: 1,
        }
    }
}

impl ReplyScan {
    /// The length of the reply once `buffer` holds all of it; `None` while it does not.
    pub fn advance(&mut self, buffer: &[u8]) -> Result<Option<usize>, String> {
        while self.remaining > 0 {
            let Some(Header {
                kind,
                line,
                next: after,
            }) = header(buffer, self.position)?
            else {
                return Ok(None);
            };
            let next = match kind {
                b'+' | b'-' | b':' => after,
                b'$' => match length(line)? {
                    None => after,
                    Some(n) => {
                        let end = after.saturating_add(n).saturating_add(2);
                        if buffer.len() < end {
                            return Ok(None);
                        }
                        if &buffer[end - 2..end] != b"\r\n" {
                            return Err("a bulk string not ended by CRLF".into());
                        }
                        end
                    }
                },
                b'*' => {
                    if let Some(n) = length(line)? {
                        self.remaining = self
                            .remaining
                            .checked_add(n as u64)
                            .ok_or("more values than can be counted")?;
                    }
                    after
                }
                other => return Err(format!("unexpected type byte {:?}", other as char)),
            };
            self.position = next;
            self.remaining -= 1;
        }
        Ok(Some(self.position))
    }
}

/// The first line of a value: its type byte and the rest of the line.
#[derive(Debug)]
pub struct Header<'a> {
    /// The type byte (`*`, `$`, `+`, `-`, `:`).
    pub kind: u8,
    /// The line after the type byte, without CRLF.
    pub line: &'a [u8],
    /// Where the next line starts.
    pub next: usize,
}

/// The header of the value at `at`; `None` when its line is not whole yet.
pub fn header(buffer: &[u8], at: usize) -> Result<Option<Header<'_>>, String> {
    let Some(rest) = buffer.get(at..) else {
        return Ok(None);
    };
    let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    if newline < 2 || rest[newline - 1] != b'\r' {
        return Err("a line not ended by CRLF".into());
    }
    Ok(Some(Header {
        kind: rest[0],
        line: &rest[1..newline - 1],
        next: at + newline + 1,
    }))
}

/// A length header: `None` for -1 (a nil), else the count.
pub fn length(line: &[u8]) -> Result<Option<usize>, String> {
    if line == b"-1" {
        return Ok(None);
    }
    if line.is_empty() || line.len() > 18 || !line.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "bad length {:?}",
            String::from_utf8_lossy(line).into_owned()
        ));
    }
    Ok(Some(
        line.iter()
            .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0')),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_whole(bytes: &[u8]) -> Result<Option<usize>, String> {
        ReplyScan::default().advance(bytes)
    }

    #[test]
    fn a_reply_is_whole_only_once_every_nested_value_arrived() {
        let reply = b"*2\r\n$3\r\nabc\r\n*3\r\n:1\r\n$-1\r\n*-1\r\n+OK\r\n";
        let whole = reply.len() - b"+OK\r\n".len();
        for cut in 0..whole {
            assert_eq!(scan_whole(&reply[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(scan_whole(reply), Ok(Some(whole)));
        // Resumed byte by byte, the scan ends at the same place.
        let mut scan = ReplyScan::default();
        let mut found = None;
        for end in 0..=reply.len() {
            if let Some(len) = scan.advance(&reply[..end]).unwrap() {
                found = Some((end, len));
                break;
            }
        }
        assert_eq!(found, Some((whole, whole)));
    }

    #[test]
    fn malformed_replies_are_errors_not_waits() {
        for bad in [
            &b"$3\r\nabcd\r\n"[..],
            b"*x\r\n",
            b"$-2\r\n",
            b"?\r\n",
            b"+OK\n",
        ] {
            assert!(
                scan_whole(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
