//! Speaks the vpcd protocol (vsmartcard's virtual reader driver inside pcscd) for a
//! [`VirtualCard`]: every message is a 2-byte big-endian length and a payload; a 1-byte payload
//! is a control message (0 power off, 1 power on, 2 reset, 4 ATR request), anything else an
//! APDU to answer with data + SW1 SW2.

use crate::vcard::VirtualCard;
use std::io::{self, Read, Write};
use std::time::Duration;

/// Default port of the first vpcd reader ("Virtual PCD 00 00").
pub const VPCD_PORT: u16 = 35963;

/// Behaviour of the connection, on top of the card's own switches.
#[derive(Clone, Debug, Default)]
pub struct LinkOptions {
    /// Sleep this long before every answer.
    pub delay: Duration,
    /// Answer this many APDUs, then drop the connection on the next one without answering.
    pub remove_after: Option<usize>,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The reader side closed the connection (pcscd stopped or restarted).
    Closed,
    /// `remove_after` was reached and we dropped the connection.
    Removed,
}

/// Observes APDU exchanges (the binary uses it to persist state and record answers).
pub trait Observer {
    fn after_apdu(&mut self, card: &mut VirtualCard);
}

impl Observer for () {
    fn after_apdu(&mut self, _card: &mut VirtualCard) {}
}

fn read_msg(stream: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf)?;
    Ok(Some(buf))
}

fn write_msg(stream: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "vpcd message over 64 KiB"))?;
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    stream.write_all(&out)?;
    stream.flush()
}

/// Serves one vpcd connection until it closes or `remove_after` strikes.
/// `apdus_answered` counts across reconnections.
pub fn serve(
    stream: &mut (impl Read + Write),
    card: &mut VirtualCard,
    link: &LinkOptions,
    apdus_answered: &mut usize,
    observer: &mut impl Observer,
) -> io::Result<SessionEnd> {
    loop {
        let Some(msg) = read_msg(stream)? else {
            return Ok(SessionEnd::Closed);
        };
        match msg.as_slice() {
            [0] | [1] | [2] => card.reset(),
            [4] => write_msg(stream, &VirtualCard::atr())?,
            [other] => {
                tracing::warn!(control = other, "unknown vpcd control message ignored");
            }
            apdu => {
                if link.remove_after.is_some_and(|n| *apdus_answered >= n) {
                    return Ok(SessionEnd::Removed);
                }
                let resp = card.process(apdu);
                observer.after_apdu(card);
                if !link.delay.is_zero() {
                    std::thread::sleep(link.delay);
                }
                write_msg(stream, &resp)?;
                *apdus_answered += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcard::{CardIdentity, CardOptions};

    /// A scripted peer: what vpcd would send, and what we wrote back.
    struct Pipe {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Pipe {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.extend_from_slice(&(m.len() as u16).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn control_messages_and_apdus() {
        let select = qgenome::consent::apdu::select_piv().to_bytes().unwrap();
        let mut pipe = Pipe {
            input: io::Cursor::new(framed(&[&[1], &[4], &select, &select])),
            output: Vec::new(),
        };
        let mut card = VirtualCard::new(CardIdentity::generate().unwrap(), CardOptions::default());
        let mut n = 0;
        let link = LinkOptions {
            remove_after: Some(1),
            ..Default::default()
        };
        let end = serve(&mut pipe, &mut card, &link, &mut n, &mut ()).unwrap();
        assert_eq!(end, SessionEnd::Removed);
        assert_eq!(n, 1);
        let atr = VirtualCard::atr();
        let mut r = io::Cursor::new(pipe.output);
        assert_eq!(read_msg(&mut r).unwrap().unwrap(), atr);
        let resp = read_msg(&mut r).unwrap().unwrap();
        assert_eq!(&resp[resp.len() - 2..], &[0x90, 0x00]);
        assert!(
            read_msg(&mut r).unwrap().is_none(),
            "second SELECT unanswered"
        );
    }
}
