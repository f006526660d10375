//! Token parsing and verification on arbitrary input: must never panic,
//! and never accept anything (the key is fresh per run).
#![no_main]
use std::sync::OnceLock;

static ROOT: OnceLock<lever_policy::token::RootKey> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let root = ROOT.get_or_init(lever_policy::token::RootKey::generate);
    if let Ok(s) = std::str::from_utf8(data) {
        assert!(lever_policy::token::verify(&root.public(), s).is_err());
    }
});
