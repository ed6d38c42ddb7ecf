//! BER-TLV parser on arbitrary bytes: must never panic, must stay inside its input, and what it
//! accepts must re-encode to a parse of the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qgenome::consent::tlv;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = tlv::parse_all(data) {
        let mut again = Vec::new();
        for t in &items {
            let _ = t.children();
            tlv::encode_into(t.tag, t.value, &mut again).expect("parsed values re-encode");
        }
        let back = tlv::parse_all(&again).expect("minimal re-encoding parses");
        assert_eq!(back.len(), items.len());
        for (a, b) in back.iter().zip(&items) {
            assert_eq!(a.tag, b.tag);
            assert_eq!(a.value, b.value);
        }
    }
    let _ = tlv::parse_exact(data, tlv::Tag::DATA);
    let _ = tlv::find(data, tlv::Tag::from_const(0x5FC102));
});
