//! Writing to stdout without panicking when the reader goes away
//! (`lever schema | head`): a closed pipe ends the command quietly.

use std::io::Write;

pub(crate) fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let r = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("lever: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

pub(crate) fn println(text: &str) {
    print(&format!("{text}\n"));
}
