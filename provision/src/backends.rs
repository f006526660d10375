//! `lever backends`: the implemented containment matrix.

use std::process::ExitCode;

use lever_policy::backend::Backend;

pub(crate) const AFTER_HELP: &str = "\
Only implemented backends are listed: a backend exists in this build iff it
can be selected with `backend:` in lever.yaml. The roadmap (apple-container)
and the rejected ones (Docker Desktop, a native linux-docker jail without a
VM) are explained in docs/backends.md; naming them in lever.yaml is an error,
never a silent substitution.";

const HEADERS: [&str; 5] = [
    "Backend",
    "Kernel",
    "FS bounded by",
    "Egress enforced at",
    "Version-fragile",
];

pub(crate) fn run(json: bool) -> ExitCode {
    let rows: Vec<[String; 5]> = Backend::ALL
        .iter()
        .map(|b| {
            let r = b.row();
            [
                b.name().to_owned(),
                r.kernel.to_owned(),
                r.fs_bounded_by.to_owned(),
                r.egress_enforced_at.to_owned(),
                r.version_fragile.to_owned(),
            ]
        })
        .collect();
    if json {
        let v: Vec<serde_json::Value> = Backend::ALL
            .iter()
            .map(|b| {
                let r = b.row();
                serde_json::json!({
                    "backend": b.name(),
                    "kernel": r.kernel,
                    "fs_bounded_by": r.fs_bounded_by,
                    "egress_enforced_at": r.egress_enforced_at,
                    "version_fragile": r.version_fragile,
                    "host_alias": r.host_alias,
                    "hosts": r.hosts,
                })
            })
            .collect();
        crate::out::println(&serde_json::Value::from(v).to_string());
        return ExitCode::SUCCESS;
    }
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let print = |cells: &[String]| {
        let line: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        crate::out::println(line.join("  ").trim_end());
    };
    print(&HEADERS.map(str::to_owned));
    print(&widths.map(|w| "-".repeat(w)));
    for row in &rows {
        print(row);
    }
    ExitCode::SUCCESS
}
