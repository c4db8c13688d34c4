//! `keav c2 serve` refuses HTTP limits that would stop it from answering, before it writes
//! anything.

mod common;

use common::{path_str, run, SHORT};

#[test]
fn c2_serve_refuses_zero_http_limits_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, says) in [
        ("--http-max-in-flight", "0", "at least 1"),
        ("--http-max-operator-in-flight", "0", "at least 1"),
        ("--http-body-timeout", "0", "at least 1 second"),
        ("--http-request-timeout", "0", "at least 1 second"),
        ("--http-max-connections", "0", "at least 1"),
        ("--http-header-timeout", "0", "at least 1 second"),
    ] {
        let data = dir.path().join(flag.trim_start_matches('-'));
        let out = run(
            &[
                "c2",
                "serve",
                "--data",
                path_str(&data),
                "--http",
                "127.0.0.1:0",
                flag,
                value,
            ],
            SHORT,
        );
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(
            out.stderr.contains(flag) && out.stderr.contains(says),
            "{}",
            out.stderr
        );
        assert!(!data.exists(), "{flag}: the data directory was created");
    }
}
