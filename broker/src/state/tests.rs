use super::*;

fn fresh() -> Result<Fresh, StartError> {
    Ok(Fresh {
        ca_key_pem: "ca-key".into(),
        ca_cert_pem: "ca-cert".into(),
        root_key_pem: "root-key".into(),
    })
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lever-state-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

#[test]
fn revoking_a_token_revokes_its_whole_delegation_tree() {
    let mut s = Persisted::new();
    s.children
        .entry("a".into())
        .or_default()
        .extend(["b".to_owned(), "c".to_owned()]);
    s.children.entry("b".into()).or_default().insert("d".into());
    s.children.entry("x".into()).or_default().insert("y".into());
    let mut got = revoke_token_tree(&mut s, "a", 7);
    got.sort();
    assert_eq!(got, ["a", "b", "c", "d"]);
    assert!(!s.revoked_tokens.contains_key("x") && !s.revoked_tokens.contains_key("y"));
    // Cycles (which delegation cannot create) still terminate.
    s.children.entry("d".into()).or_default().insert("a".into());
    revoke_token_tree(&mut s, "a", 8);
}

#[test]
fn a_new_dir_is_created_private_and_reopened_with_its_changes() {
    let d = tempdir("new");
    let loaded = State::open(&d, fresh).unwrap();
    assert!(loaded.created);
    loaded
        .state
        .update(|s| {
            s.epoch = 9;
            Ok::<_, std::io::Error>(())
        })
        .unwrap();
    drop(loaded);
    let again = State::open(&d, || panic!("must not re-create")).unwrap();
    assert!(!again.created);
    assert_eq!(again.state.epoch(), 9);
    assert_eq!(again.root_key_pem, "root-key");
    assert_eq!(
        fs::metadata(&d).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn the_lock_is_taken_before_the_state_is_read() {
    // Another broker holds the dir: the answer is "in use", whatever the
    // state holds (here, something unreadable), never a read of it.
    let d = tempdir("held");
    drop(State::open(&d, fresh).unwrap());
    let other = State::open(&d, || panic!("must not re-create")).unwrap();
    fs::write(d.join(STATE), "not json").unwrap();
    let e = State::open(&d, || panic!("must not re-create"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("in use by another broker"), "{e}");
    drop(other);
    let e = State::open(&d, || panic!("must not re-create"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("corrupt"), "{e}");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn readers_never_wait_for_a_change_being_written() {
    // A change holds the writer's lock through its work and its fsyncs;
    // requests read the state meanwhile (the state before the change),
    // never queued behind the disk.
    let d = tempdir("readers");
    let loaded = State::open(&d, fresh).unwrap();
    let state = &loaded.state;
    std::thread::scope(|s| {
        let (started_tx, started) = std::sync::mpsc::channel();
        s.spawn(move || {
            state
                .update(|p| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(600));
                    p.epoch = 2;
                    Ok::<_, std::io::Error>(())
                })
                .unwrap();
        });
        started.recv().unwrap();
        let t = std::time::Instant::now();
        assert_eq!(state.epoch(), 1);
        assert!(
            t.elapsed() < std::time::Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    });
    assert_eq!(state.epoch(), 2);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn a_failed_update_changes_nothing() {
    let d = tempdir("fail");
    let loaded = State::open(&d, fresh).unwrap();
    let r: Result<(), std::io::Error> = loaded.state.update(|s| {
        s.epoch = 5;
        Err(std::io::Error::other("no"))
    });
    assert!(r.is_err());
    assert_eq!(loaded.state.epoch(), 1);
    let on_disk: Persisted =
        serde_json::from_str(&fs::read_to_string(d.join(STATE)).unwrap()).unwrap();
    assert_eq!(on_disk.epoch, 1);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn foreign_contents_are_never_initialized_over() {
    let d = tempdir("foreign");
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(d.join("notes.txt"), "mine").unwrap();
    let e = State::open(&d, fresh).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn an_open_dir_is_refused() {
    let d = tempdir("open");
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    let e = State::open(&d, fresh).unwrap_err().to_string();
    assert!(e.contains("must be 0700"), "{e}");
    let _ = fs::remove_dir_all(&d);
}

/// A state dir as `lever apply` leaves it before the broker's first start.
fn provisioned(tag: &str) -> PathBuf {
    let d = tempdir(tag);
    fs::create_dir_all(d.join(LIMA_DIR)).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(d.join(LIMA_DIR).join("lever-demo.yaml"), "images: []\n").unwrap();
    fs::write(d.join(BROKER_LOG), "").unwrap();
    fs::write(d.join(QEMU_CONSOLE), "boot\n").unwrap();
    d
}

#[test]
fn what_provisioning_wrote_is_initialized_over_and_kept() {
    let d = provisioned("provisioned");
    let loaded = State::open(&d, fresh).unwrap();
    assert!(loaded.created);
    drop(loaded);
    assert!(d.join(LIMA_DIR).join("lever-demo.yaml").exists());
    assert!(
        !State::open(&d, || panic!("must not re-create"))
            .unwrap()
            .created
    );
    let _ = fs::remove_dir_all(&d);
}

/// Puts something into a provisioned state dir.
type Plant = fn(&Path);

#[test]
fn anything_else_beside_what_provisioning_wrote_is_refused() {
    let cases: [(&str, Plant); 5] = [
        ("a file of someone else's", |d| {
            fs::write(d.join("notes.txt"), "mine").unwrap();
        }),
        ("a file in lima/ that is no machine definition", |d| {
            fs::write(d.join(LIMA_DIR).join("notes.txt"), "mine").unwrap();
        }),
        ("a directory in lima/", |d| {
            fs::create_dir(d.join(LIMA_DIR).join("x.yaml")).unwrap();
        }),
        ("the log as a directory", |d| {
            fs::remove_file(d.join(BROKER_LOG)).unwrap();
            fs::create_dir(d.join(BROKER_LOG)).unwrap();
        }),
        ("the console log as a symlink", |d| {
            fs::remove_file(d.join(QEMU_CONSOLE)).unwrap();
            std::os::unix::fs::symlink("/etc/hostname", d.join(QEMU_CONSOLE)).unwrap();
        }),
    ];
    for (i, (what, plant)) in cases.into_iter().enumerate() {
        let d = provisioned(&format!("planted{i}"));
        plant(&d);
        let e = State::open(&d, fresh).unwrap_err().to_string();
        assert!(e.contains("holds no broker state"), "{what}: {e}");
        assert!(!d.join(STATE).exists(), "{what}");
        let _ = fs::remove_dir_all(&d);
    }
}
