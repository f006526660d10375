//! lever-policy: the pure core of Lever.
//!
//! What it holds: the `lever.yaml` model (raw types, validation, the
//! validated [`config::Config`], its JSON Schema), the backend matrix as
//! data, and the capability tokens ([`token`]: Biscuit mint, attenuation,
//! authorization, delegation proofs).
//!
//! What it must never do: open a socket, start a runtime, write a file, or
//! read a secret's contents. It decides; the broker and the CLI act.

#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod egress;
pub mod hex;
pub mod timefmt;
pub mod token;
