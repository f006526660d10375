//! The whole lever.yaml pipeline on arbitrary bytes: parse, deserialize,
//! every rule. Must never panic, hang or blow the budgets.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = lever_policy::config::internal::check_bytes(data);
});
