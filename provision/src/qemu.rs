//! The `qemu` backend: a VM Lever drives directly with QEMU, for Linux
//! hosts without Lima.
//!
//! - KVM when the host has hardware virtualization (`vmx`/`svm` and a
//!   usable `/dev/kvm`), otherwise software emulation (TCG), said loudly.
//! - Exactly one host directory is shared: the tree, over virtio-9p with
//!   the tag `lever` (the guest mounts it at `/lever`), `mapped-xattr` so
//!   guest root cannot make host files owned by host root.
//! - User-mode networking. The broker is reachable at `10.0.2.100:PORT`
//!   through a `guestfwd` that runs `lever relay` for each connection
//!   (QEMU's direct `tcp:` form connects once and then hangs). With
//!   `egress: closed` the network device itself is `restrict=on`: the guest
//!   reaches that forward and nothing else, whatever root inside it does.
//!   With `egress: open` the guest's own rules (`lever egress-rules`) fence
//!   it, host alias `10.0.2.100`, resolver `10.0.2.3`.
//! - No default devices, no user config, a seccomp sandbox (`-sandbox`),
//!   no reboot, the console on a serial port.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lever_policy::config::Egress;

/// Where the guest reaches the broker.
pub(crate) const BROKER_ALIAS: &str = "10.0.2.100";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM only when the CPU has hardware virtualization and `/dev/kvm`
    /// opens; a software hypervisor behind `/dev/kvm` cannot run a stock
    /// kernel.
    pub(crate) fn detect() -> Accel {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpu
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if hw && dev { Accel::Kvm } else { Accel::Tcg }
    }
}

/// What a qemu jail is made of.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub name: String,
    /// The tree: the one host directory the guest sees.
    pub tree: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub egress: Egress,
    /// The broker's jail port on the host (loopback).
    pub broker_port: u16,
    /// The `lever` executable that relays guest connections to the broker.
    pub lever: PathBuf,
    /// Where the serial console goes.
    pub console: PathBuf,
}

/// QEMU's option syntax doubles a comma inside a value.
fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The QEMU command line (program first).
pub(crate) fn argv(m: &Machine) -> Vec<String> {
    let mut a: Vec<String> = vec!["qemu-system-x86_64".into()];
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("lever-{}", m.name)]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    // A seccomp sandbox. `spawn` and `elevateprivileges` stay allowed: the
    // guestfwd relay is a spawned command, and spawning it fails under
    // `elevateprivileges=deny` (found by the qemu jail test).
    push(&["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
    push(&[
        "-accel",
        match m.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        },
    ]);
    if m.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &m.memory_mib.to_string(), "-smp", &m.cpus.to_string()]);
    push(&["-kernel", &m.kernel.display().to_string()]);
    if let Some(i) = &m.initrd {
        push(&["-initrd", &i.display().to_string()]);
    }
    push(&["-append", &m.append]);
    push(&["-serial", &format!("file:{}", esc(&m.console))]);
    // The one share.
    push(&[
        "-fsdev",
        &format!(
            "local,id=tree,path={},security_model=mapped-xattr",
            esc(&m.tree)
        ),
        "-device",
        "virtio-9p-pci,fsdev=tree,mount_tag=lever",
    ]);
    let relay = format!("{} relay 127.0.0.1:{}", esc(&m.lever), m.broker_port);
    let restrict = match m.egress {
        Egress::Closed => ",restrict=on",
        Egress::Open => "",
    };
    push(&[
        "-netdev",
        &format!(
            "user,id=net0{restrict},guestfwd=tcp:{BROKER_ALIAS}:{}-cmd:{relay}",
            m.broker_port
        ),
        "-device",
        "virtio-net-pci,netdev=net0",
    ]);
    a
}

pub(crate) struct RunArgs {
    pub config: Option<PathBuf>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub memory: u32,
    pub cpus: u32,
    pub console: Option<PathBuf>,
    pub dry_run: bool,
}

/// `lever qemu`: the jail VM of this config, in the foreground.
pub(crate) fn run(a: RunArgs) -> ExitCode {
    let config = match crate::common::load_config(a.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.backend != lever_policy::backend::Backend::Qemu {
        return crate::common::fail(&format!(
            "this instance's backend is `{}`, not qemu",
            config.backend.name()
        ));
    }
    let tree = config.root.join(&config.tree);
    if !tree.is_dir() {
        return crate::common::fail(&format!(
            "the tree {} does not exist (create it first)",
            tree.display()
        ));
    }
    let lever = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return crate::common::fail(&format!("cannot find the lever executable: {e}")),
    };
    let accel = Accel::detect();
    let default_console = a.console.is_none();
    let m = Machine {
        name: config.name.to_string(),
        tree,
        kernel: a.kernel,
        initrd: a.initrd,
        append: a.append,
        memory_mib: a.memory,
        cpus: a.cpus,
        accel,
        egress: config.egress,
        broker_port: config.broker.jail_port,
        lever,
        console: a.console.unwrap_or_else(|| {
            config
                .broker
                .state_dir
                .join(lever_broker::state::QEMU_CONSOLE)
        }),
    };
    let argv = argv(&m);
    if a.dry_run {
        for (i, x) in argv.iter().enumerate() {
            let sep = if i + 1 == argv.len() { "\n" } else { " \\\n  " };
            print!("{}{sep}", shell_quote(x));
        }
        return ExitCode::SUCCESS;
    }
    // The default console, in the state dir, is made here 0600 (and the
    // state dir 0700) before QEMU would create it with its umask; QEMU
    // truncates it and keeps the mode. A --console path is the operator's.
    if default_console && let Err(e) = crate::common::private_file(&m.console, true) {
        return crate::common::fail(&e);
    }
    if accel == Accel::Tcg {
        eprintln!(
            "lever qemu: WARNING: no hardware virtualization here; running the jail under software emulation (slow, but the same boundary)"
        );
    }
    eprintln!(
        "lever qemu: starting lever-{} (console: {})",
        m.name,
        m.console.display()
    );
    match std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
    {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => crate::common::fail(&format!("qemu exited: {s}")),
        Err(e) => crate::common::fail(&format!(
            "{}: {e} (install QEMU: apt-get install qemu-system-x86)",
            argv[0]
        )),
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `lever relay ADDR`: copies stdin to a TCP connection to ADDR and the
/// connection to stdout, until either side ends. QEMU runs it for each
/// guest connection to the broker alias.
pub(crate) fn relay(to: SocketAddr) -> ExitCode {
    let Ok(sock) = std::net::TcpStream::connect(to) else {
        return ExitCode::FAILURE;
    };
    let _ = sock.set_nodelay(true);
    let Ok(mut up) = sock.try_clone() else {
        return ExitCode::FAILURE;
    };
    let inbound = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || up.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = sock;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = down.read(&mut buf) {
        if n == 0 || stdout.write_all(&buf[..n]).is_err() || stdout.flush().is_err() {
            break;
        }
    }
    drop(inbound);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn machine(egress: Egress) -> Machine {
        Machine {
            name: "t".into(),
            tree: "/srv/inst,1/ws".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd".into()),
            append: "console=ttyS0".into(),
            memory_mib: 512,
            cpus: 2,
            accel: Accel::Tcg,
            egress,
            broker_port: 8443,
            lever: "/usr/bin/lever".into(),
            console: "/tmp/console.log".into(),
        }
    }

    #[test]
    fn closed_restricts_the_network_device_and_forwards_only_the_broker() {
        let a = argv(&machine(Egress::Closed));
        let net = &a[a.iter().position(|x| x == "-netdev").unwrap() + 1];
        assert_eq!(
            net,
            "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:8443-cmd:/usr/bin/lever relay 127.0.0.1:8443"
        );
        // Exactly one share, its path escaped for QEMU's option syntax.
        assert_eq!(a.iter().filter(|x| *x == "-fsdev").count(), 1);
        assert!(a.contains(
            &"local,id=tree,path=/srv/inst,,1/ws,security_model=mapped-xattr".to_owned()
        ));
        assert!(!a.iter().any(|x| x == "-virtfs" || x.starts_with("hostfwd")));
        assert!(a.contains(&"-nodefaults".to_owned()) && a.contains(&"-no-user-config".to_owned()));
    }

    #[test]
    fn open_leaves_the_device_unrestricted_for_the_guest_rules() {
        let a = argv(&machine(Egress::Open));
        let net = &a[a.iter().position(|x| x == "-netdev").unwrap() + 1];
        assert!(!net.contains("restrict"), "{net}");
        assert!(net.contains("guestfwd=tcp:10.0.2.100:8443-cmd:"));
    }
}
