use std::time::{Duration, SystemTime};

use super::*;

#[test]
fn the_server_certificate_is_replaced_with_a_third_of_its_life_left() {
    let now = SystemTime::now();
    assert!(!ServerCert::due(now + SERVER_CERT_TTL, now));
    assert!(!ServerCert::due(now + SERVER_CERT_TTL / 2, now));
    assert!(ServerCert::due(now + SERVER_CERT_TTL / 4, now));
    assert!(
        ServerCert::due(now - Duration::from_secs(1), now),
        "expired"
    );
}

#[test]
fn the_jail_listener_never_resumes_a_session() {
    // Resumption would skip the client certificate's checks (its expiry
    // among them) for the life of a ticket.
    let (key, cert) = crate::ca::Ca::generate("t").unwrap();
    let ca = Arc::new(crate::ca::Ca::load(&key, &cert).unwrap());
    let config = server_config(&ca, Arc::new(ServerCert::new(ca.clone()).unwrap())).unwrap();
    assert_eq!(config.send_tls13_tickets, 0);
    assert!(!config.session_storage.can_cache());
    assert!(!config.ticketer.enabled());
}

#[test]
fn rotation_issues_a_new_certificate_when_due() {
    let (key, cert) = crate::ca::Ca::generate("t").unwrap();
    let ca = Arc::new(crate::ca::Ca::load(&key, &cert).unwrap());
    let sc = ServerCert::new(ca).unwrap();
    let first = sc.not_after();
    assert!(!sc.rotate_if_due(SystemTime::now()).unwrap());
    // Six days on, a day of a seven-day certificate is left: rotate.
    let later = SystemTime::now() + Duration::from_secs(6 * 86_400);
    assert!(sc.rotate_if_due(later).unwrap());
    assert!(sc.not_after() >= first);
}

#[test]
fn the_server_certificate_names_every_host_alias() {
    let (key, cert) = crate::ca::Ca::generate("t").unwrap();
    let ca = crate::ca::Ca::load(&key, &cert).unwrap();
    let (chain, _, _) = ca.issue_server().unwrap();
    let (_, x) = <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<
        x509_parser::error::X509Error,
    >>::from_der(chain[0].as_ref())
    .unwrap();
    let sans = x
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    for name in [
        "DNSName(host.orb.internal)",
        "DNSName(host.lima.internal)",
        "DNSName(localhost)",
        "IPAddress(7f:00:00:01)",
    ] {
        assert!(sans.contains(name), "{name} missing from {sans}");
    }
}
