//! `lever broker`: run the broker in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::common::{fail, load_config, runtime};

pub(crate) const AFTER_HELP: &str = "\
Opens (or, on first start, creates) the state dir (broker.state_dir, 0700):
the CA, the capability root key, the epoch, revocations and the audit log.
A damaged or incomplete state dir is an error, never a silent reset.
Listens on broker.bind:jail_port (mTLS, TLS 1.3) and on the loopback admin
port; prints one `lever broker ready: ...` line when both are up. Stops on
SIGINT or SIGTERM. Standalone: any mTLS client enrolled with a ticket from
`lever admin register` can use it, with or without a jail.";

pub(crate) fn run(config: Option<PathBuf>) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result =
        lever_broker::open(config).and_then(|broker| rt.block_on(lever_broker::run(broker)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("broker: {e}")),
    }
}
