//! lever-broker: the host-side capability broker.
//!
//! It will hold the real secrets, enrol agents into mTLS identities, mint
//! and verify capability tokens, proxy `/llm` and multiplex `/mcp`. For now
//! it is a skeleton that loads a validated config.
//!
//! What it must never do: hand a secret, a token or a ticket to anyone who
//! did not send it; accept a request before the caller is authenticated.

#![forbid(unsafe_code)]

use lever_policy::config::Config;

/// What the broker would serve, in one line (a placeholder until the
/// listeners land).
pub fn describe(config: &Config) -> String {
    format!(
        "jail listener {} (mTLS), admin {} (loopback), upstream {}",
        config.broker.jail_addr(),
        config.broker.admin_addr(),
        config.broker.upstream
    )
}
