//! Command and response APDU parsers on arbitrary bytes: never panic; parsed short commands
//! re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qgenome::consent::apdu::{Command, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = Command::parse(data) {
        // Extended Le above 256 has no short encoding; everything else must round-trip.
        let short_le = cmd.le.is_none_or(|le| le <= 256);
        if let (true, Ok(bytes)) = (short_le, cmd.to_bytes()) {
            let again = Command::parse(&bytes).expect("own encoding parses");
            assert_eq!(again, cmd);
        }
    }
    let _ = Response::parse(data);
});
