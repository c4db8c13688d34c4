//! Builds the C shim around Linphone's bzrtp (csrc/shim.c) and links it
//! against the system libbzrtp (+ bctoolbox, sqlite3).
//!
//! When bzrtp is not installed: with `CI` set the build fails (CI must test
//! interop), otherwise it warns and sets `cfg(no_bzrtp)` so the tests skip.
//! `KEAV_BZRTP_PREFIX=/opt/x` adds /opt/x/include and /opt/x/lib to the search.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Include and library directories reported by pkg-config, if it knows the package.
fn pkg_config(pkg: &str) -> Option<(Vec<PathBuf>, Vec<PathBuf>)> {
    let out = Command::new("pkg-config")
        .args(["--cflags", "--libs", pkg])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut incs = Vec::new();
    let mut libs = Vec::new();
    for tok in text.split_whitespace() {
        if let Some(p) = tok.strip_prefix("-I") {
            incs.push(PathBuf::from(p));
        } else if let Some(p) = tok.strip_prefix("-L") {
            libs.push(PathBuf::from(p));
        }
    }
    Some((incs, libs))
}

fn find_in(dirs: &[PathBuf], rel: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(rel)).find(|p| p.exists())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_bzrtp)");
    println!("cargo:rerun-if-changed=csrc/shim.c");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CI");
    println!("cargo:rerun-if-env-changed=KEAV_BZRTP_PREFIX");
    println!("cargo:rerun-if-env-changed=KEAV_INTEROP_FORCE_NO_BZRTP");

    let mut inc_dirs: Vec<PathBuf> = Vec::new();
    let mut lib_dirs: Vec<PathBuf> = Vec::new();
    if let Ok(prefix) = env::var("KEAV_BZRTP_PREFIX") {
        inc_dirs.push(Path::new(&prefix).join("include"));
        lib_dirs.push(Path::new(&prefix).join("lib"));
    }
    for pkg in ["libbzrtp", "bctoolbox", "sqlite3"] {
        if let Some((i, l)) = pkg_config(pkg) {
            inc_dirs.extend(i);
            lib_dirs.extend(l);
        }
    }
    inc_dirs.extend(["/usr/include", "/usr/local/include"].map(PathBuf::from));
    lib_dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
        ]
        .map(PathBuf::from),
    );

    // KEAV_INTEROP_FORCE_NO_BZRTP=1 pretends bzrtp is absent (to test that path).
    let forced_off = env::var_os("KEAV_INTEROP_FORCE_NO_BZRTP").is_some();
    let header = find_in(&inc_dirs, "bzrtp/bzrtp.h").filter(|_| !forced_off);
    let sqlite_header = find_in(&inc_dirs, "sqlite3.h");
    let lib = find_in(&lib_dirs, "libbzrtp.so").or_else(|| find_in(&lib_dirs, "libbzrtp.a"));

    if header.is_none() || lib.is_none() || sqlite_header.is_none() {
        let what = match (&header, &lib, &sqlite_header) {
            (None, _, _) => "bzrtp/bzrtp.h not found",
            (_, None, _) => "libbzrtp.so not found",
            _ => "sqlite3.h not found",
        };
        if env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0") {
            panic!(
                "keav-interop: {what}. CI needs the bzrtp interop tests: install libbzrtp-dev \
                 (and libsqlite3-dev), e.g. `apt-get install -y libbzrtp-dev libsqlite3-dev`"
            );
        }
        println!(
            "cargo:warning=keav-interop: {what}; bzrtp interop tests will be skipped \
             (install libbzrtp-dev and libsqlite3-dev to run them)"
        );
        println!("cargo:rustc-cfg=no_bzrtp");
        return;
    }

    let mut build = cc::Build::new();
    build
        .file("csrc/shim.c")
        .warnings(true)
        .flag_if_supported("-std=c99");
    // The compiler already searches the system directories; passing
    // `-I/usr/include` explicitly would only perturb its search order.
    for d in &inc_dirs {
        if d.exists() && d != Path::new("/usr/include") && d != Path::new("/usr/local/include") {
            build.include(d);
        }
    }
    build.compile("keav_bzrtp_shim");

    let mut seen = std::collections::HashSet::new();
    for d in &lib_dirs {
        if d.exists() && seen.insert(d.clone()) {
            println!("cargo:rustc-link-search=native={}", d.display());
        }
    }
    // libbzrtp.so pulls bctoolbox itself, but the shim also calls sqlite3
    // directly and bctoolbox symbols may be referenced through bzrtp.h inlines.
    println!("cargo:rustc-link-lib=dylib=bzrtp");
    println!("cargo:rustc-link-lib=dylib=bctoolbox");
    println!("cargo:rustc-link-lib=dylib=sqlite3");
}
