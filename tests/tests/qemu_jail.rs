//! A real `qemu` jail: `lever qemu` boots a tiny guest (Debian's kernel and
//! busybox, software emulation is fine) and the guest checks, from inside:
//! exactly one host share, at `/lever`, writable, its writes visible on the
//! host; the broker's jail port reachable at 10.0.2.100; the admin port,
//! another host port and the user-net resolver refused. The same guest
//! booted with `egress: open` (no `restrict=on`) does reach the host's
//! other ports, which shows the probes can see a leak.
//!
//! Needs `qemu-system-x86_64`, `cpio`, busybox-static and the guest kernel
//! extracted under `$LEVER_GUEST_DIR` (default `/var/cache/lever-test-guest`;
//! `.ci/run` fetches them). Missing pieces fail the test, saying which.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lever_tests::broker::free_port;
use lever_tests::{TempDir, lever_bin};

/// Loaded in this order (each after what it depends on).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "fs/9p/9p",
];

fn guest_dir() -> PathBuf {
    std::env::var_os("LEVER_GUEST_DIR").map_or_else(
        || PathBuf::from("/var/cache/lever-test-guest"),
        PathBuf::from,
    )
}

/// (vmlinuz, modules dir), or a panic naming what is missing.
fn kernel() -> (PathBuf, PathBuf) {
    let boot = guest_dir().join("kernel/boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        })
        .unwrap_or_else(|| {
            panic!(
                "no guest kernel under {}: fetch it as .ci/run does (apt-get download linux-image-6.1.*-amd64; dpkg -x ... {}/kernel)",
                boot.display(),
                guest_dir().display()
            )
        });
    let version = vmlinuz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    let modules = guest_dir()
        .join("kernel/lib/modules")
        .join(version)
        .join("kernel");
    (vmlinuz, modules)
}

fn require(program: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "`{program}` is missing (.ci/run installs qemu-system-x86, cpio and busybox-static)"
    );
}

/// The guest's /init: load the drivers, mount the share, report.
fn init_script(jail_port: u16, admin_port: u16, other_port: u16) -> String {
    let mods: Vec<String> = MODULES
        .iter()
        .map(|m| format!("insmod /lib/modules/{}.ko", m.rsplit('/').next().unwrap()))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
echo 0 > /proc/sys/kernel/printk
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{mods}
mkdir -p /lever
mount -t 9p -o trans=virtio,version=9p2000.L lever /lever
echo "LEVER shares $(grep -c ' 9p ' /proc/mounts)"
echo "LEVER tags $(cat /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag 2>/dev/null | tr '\0' ' ')"
echo "LEVER read $(cat /lever/from-host)"
if echo hello-from-guest > /lever/from-guest; then echo "LEVER write ok"; else echo "LEVER write failed"; fi
sync
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
probe() {{ echo "LEVER probe $1 $(nc -w 2 $2 $3 </dev/null 2>/dev/null | wc -c)"; }}
probe broker 10.0.2.100 {jail_port}
probe admin-via-gateway 10.0.2.2 {admin_port}
probe other-via-gateway 10.0.2.2 {other_port}
probe admin-via-alias 10.0.2.100 {admin_port}
probe resolver 10.0.2.3 53
probe public 203.0.113.1 80
echo "LEVER done"
poweroff -f
"#,
        mods = mods.join("\n")
    )
}

/// Builds the initramfs (newc cpio) from busybox, the modules and /init.
fn initramfs(dir: &Path, init: &str) -> PathBuf {
    let (_, modules) = kernel();
    let stage = dir.join("stage");
    for d in ["bin", "proc", "sys", "dev", "lib/modules", "tmp"] {
        std::fs::create_dir_all(stage.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .expect("busybox-static (/bin/busybox)");
    for m in MODULES {
        let name = format!("{}.ko", m.rsplit('/').next().unwrap());
        std::fs::copy(
            modules.join(format!("{m}.ko")),
            stage.join("lib/modules").join(name),
        )
        .unwrap_or_else(|e| panic!("module {m}: {e}"));
    }
    std::fs::write(stage.join("init"), init).unwrap();
    std::fs::set_permissions(
        stage.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = dir.join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            stage.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed");
    out
}

/// A host listener on 127.0.0.1:port that says `what` to whoever connects.
fn say(port: u16, what: &'static str, stop: Arc<AtomicBool>) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(what.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

/// Boots the guest for a config with `egress`; returns the LEVER lines.
fn boot(egress: &str) -> (Vec<String>, TempDir) {
    require("qemu-system-x86_64");
    require("cpio");
    let (vmlinuz, _) = kernel();
    let dir = TempDir::new("qemu");
    let (jail, admin, other) = (free_port(), free_port(), free_port());
    dir.write("key", "sk-ant-x", 0o600);
    dir.mkdir("ws");
    dir.write("ws/from-host", "hello-from-host\n", 0o644);
    dir.write(
        "lever.yaml",
        format!(
            "name: q\nbackend: qemu\ntree: ws\negress: {egress}\nmanager: {{image: img/x:1}}\nbroker:\n  api_key_file: key\n  jail_port: {jail}\n  admin_port: {admin}\n"
        ),
        0o644,
    );
    // Stand-ins on the host's loopback: the jail port, the admin port and
    // another port. Only the first may ever answer the guest.
    let stop = Arc::new(AtomicBool::new(false));
    say(jail, "LEVER-BROKER\n", stop.clone());
    say(admin, "LEVER-ADMIN-LEAK\n", stop.clone());
    say(other, "LEVER-OTHER-LEAK\n", stop.clone());
    let initrd = initramfs(dir.path(), &init_script(jail, admin, other));
    let console = dir.join("console.log");
    let mut child = Command::new(lever_bin())
        .args(["qemu", "-c", "lever.yaml", "--memory", "256", "--cpus", "1"])
        .arg("--kernel")
        .arg(&vmlinuz)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--append", "console=ttyS0 panic=-1 quiet"])
        .arg("--console")
        .arg(&console)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the guest did not finish in 120 s; console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop.store(true, Ordering::Relaxed);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        status.success(),
        "lever qemu failed: {status}\n{err}\nconsole:\n{log}"
    );
    // A kernel message may share a line with ours: take ours from where it starts.
    let lines: Vec<String> = log
        .lines()
        .filter_map(|l| l.find("LEVER ").map(|i| l[i..].trim().to_owned()))
        .collect();
    assert!(
        lines.iter().any(|l| l == "LEVER done"),
        "the guest did not finish:\n{log}"
    );
    (lines, dir)
}

fn has(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

fn probe(lines: &[String], name: &str) -> usize {
    let prefix = format!("LEVER probe {name} ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no probe {name} in {lines:#?}"))
}

#[test]
fn a_closed_qemu_jail_sees_one_share_and_reaches_only_the_broker() {
    let (lines, dir) = boot("closed");
    assert!(has(&lines, "LEVER shares 1"), "{lines:#?}");
    assert!(has(&lines, "LEVER tags lever"), "{lines:#?}");
    assert!(has(&lines, "LEVER read hello-from-host"), "{lines:#?}");
    assert!(has(&lines, "LEVER write ok"), "{lines:#?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("ws/from-guest")).unwrap(),
        "hello-from-guest\n",
        "the guest's write is not on the host"
    );
    assert_eq!(
        probe(&lines, "broker"),
        "LEVER-BROKER\n".len(),
        "{lines:#?}"
    );
    for refused in [
        "admin-via-gateway",
        "other-via-gateway",
        "admin-via-alias",
        "resolver",
        "public",
    ] {
        assert_eq!(probe(&lines, refused), 0, "{refused} answered: {lines:#?}");
    }
}

/// Without `restrict=on` the same probes do see the host's other ports:
/// the closed test's zeros are the restriction, not a blind probe.
#[test]
fn an_open_qemu_jail_without_guest_rules_would_leak_which_the_probes_see() {
    let (lines, _dir) = boot("open");
    assert_eq!(
        probe(&lines, "broker"),
        "LEVER-BROKER\n".len(),
        "{lines:#?}"
    );
    assert_eq!(
        probe(&lines, "admin-via-gateway"),
        "LEVER-ADMIN-LEAK\n".len(),
        "{lines:#?}"
    );
    assert_eq!(
        probe(&lines, "other-via-gateway"),
        "LEVER-OTHER-LEAK\n".len(),
        "{lines:#?}"
    );
}
