//! The YAML layer alone (tree, prune-and-retry deserialization), which
//! runs once per problem found: must stay bounded on any input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lever_policy::config::internal::parse_raw_count(text);
    }
});
