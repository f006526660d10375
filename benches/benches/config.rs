#![allow(clippy::unwrap_used)] // A bench that cannot set up should stop loudly.

//! Loading lever.yaml: the full `lever validate` pipeline (read, parse,
//! every rule including the file-system checks) against the floor any YAML
//! config loader pays: serde-saphyr parsing the same text into a generic
//! value. The ratio is what Lever's strictness costs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use lever_benches::Harness;
use lever_policy::config::{self, Env};

fn main() {
    let h = Harness::from_env();
    println!(
        "config load ({} mode)",
        if h.quick { "quick" } else { "full" }
    );

    let dir = std::env::temp_dir().join(format!("lever-bench-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("workspace/groves/scratch")).unwrap();
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    let key = dir.join("secrets/anthropic-key");
    std::fs::write(&key, "sk-ant-placeholder").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join("prompt.md"), "boot").unwrap();
    let text = include_str!("../../examples/full/lever.yaml");
    let file = dir.join("lever.yaml");
    std::fs::write(&file, text).unwrap();
    let env = Env::from_process();

    // Make sure we measure a success, not an early error.
    config::load(&file, &env).unwrap();

    let baseline = h.measure("baseline: serde-saphyr -> generic value", || {
        serde_saphyr::from_str::<BTreeMap<String, serde_saphyr::Spanned<Generic>>>(text).unwrap()
    });
    let full = h.measure("lever: load + validate (with file checks)", || {
        config::load(&file, &env).unwrap()
    });
    h.ratio("validated load vs bare parse", full, baseline);

    let bad = "name: X\nbackend: vbox\ntree: ../t\nmanager: {image: 'A', allow_ports: [x, 8444]}\ncolour: 1\n";
    let bad_run = h.measure("lever: a config with 6 problems (no file)", || {
        config::internal::parse_raw_count(bad)
    });
    h.ratio(
        "reporting every problem vs bare parse of the full example",
        bad_run,
        baseline,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Any YAML value, as a generic loader would build it.
#[derive(Debug)]
#[allow(dead_code)]
enum Generic {
    Any,
}

impl<'de> serde::Deserialize<'de> for Generic {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Generic::Any)
    }
}
