//! Mosquitto configuration for a C2 fleet: a password file, an ACL file that confines each
//! device to its two topics ([`crate::topics`]), and a config that loads them.
//!
//! # What the broker enforces
//!
//! - Anonymous clients are refused (`allow_anonymous false`); every account is a line of the
//!   password file (`$7$`: PBKDF2-HMAC-SHA512, random 12-byte salt), never a plain password.
//! - Rights are per-user `user` blocks with literal topics, not `%u` patterns: a pattern
//!   applies to *every* authenticated user, the server account included, which would give the
//!   server a device's rights on topics named after its own user name. With literal blocks a
//!   user has exactly the lines written under its name, and a user missing from the ACL file
//!   has no rights at all.
//!   - device `<id>`: `read keav/c2/<server>/d/<id>`, `write keav/c2/<server>/s/<id>`;
//!   - server: `read keav/c2/<server>/s/+`, `write keav/c2/<server>/d/+`.
//!
//!   Mosquitto checks `read` when it delivers a message and `write` when one is published;
//!   the ACL file is not consulted for SUBSCRIBE, so a forbidden filter is granted at SUBACK
//!   and delivers nothing, and a forbidden PUBLISH is acknowledged and dropped.
//! - One listener, on 127.0.0.1 and the configured port; no persistence;
//!   `use_username_as_clientid` (a device cannot take over another device's session by
//!   reusing its client id, and every account has one session at a time);
//!   `check_retain_source` (a retained message is not delivered once its publisher has lost
//!   the right to write it).
//!
//! # Revocation
//!
//! [`MosquittoConfig::apply`] rewrites the files and sends the broker SIGHUP. Mosquitto
//! 2.0.11 then reloads the password and ACL files and re-checks every connected client: a
//! client whose user name has gone from the password file, or whose password no longer
//! matches, is disconnected at once, and its reconnection is refused (`not authorised`).
//! The integration test `tests/broker_acl.rs` checks this against a real broker; so the
//! files are enough and the dynamic-security plugin is not needed (docs/C2.md, "Broker
//! ACLs"). The reload happens in the broker's main loop after `apply` returns, not before.
//!
//! Files are replaced atomically (temporary file, fsync, rename, fsync of the directory), so
//! a reload never sees a half-written file, and each file is written 0600: the broker must
//! run as the account that writes them (see [`MosquittoConfig::run_as`]).

use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use sha2::Sha512;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::keys::DeviceId;
use crate::topics::{Topics, ROOT};

/// PBKDF2 iterations of a new hash: what `mosquitto_passwd` 2.0 uses. Passwords from
/// [`new_password`] carry 192 bits of entropy, so stretching adds nothing against guessing,
/// while every CONNECT with a known user name costs the broker this many iterations.
pub const PBKDF2_ITERATIONS: u32 = 101;
/// Most iterations [`verify_password`] and the password-file checks accept (bounds the work a
/// planted hash can cost).
pub const MAX_PBKDF2_ITERATIONS: u32 = 1_000_000;
/// Salt length of a `$7$` hash (as `mosquitto_passwd` writes it).
pub const SALT_LEN: usize = 12;
/// Length of a `$7$` hash: one SHA-512 output.
pub const HASH_LEN: usize = 64;
/// Longest broker user name accepted.
pub const MAX_USERNAME_LEN: usize = 64;
/// Random bytes in a [`new_password`] (encoded as 32 base64url characters).
pub const PASSWORD_BYTES: usize = 24;

/// Name of the password file in [`MosquittoConfig::dir`].
pub const PASSWD_FILE: &str = "passwd";
/// Name of the ACL file in [`MosquittoConfig::dir`].
pub const ACL_FILE: &str = "acl";
/// Name of the broker configuration in [`MosquittoConfig::dir`].
pub const CONF_FILE: &str = "mosquitto.conf";

/// Why broker configuration failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AclError {
    /// A file or directory could not be written, synced or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// A password hash is not in Mosquitto's `$7$<iterations>$<salt>$<hash>` format.
    #[error("malformed password hash: {0}")]
    MalformedHash(&'static str),
    /// A user name is empty, too long, or has a character outside `[A-Za-z0-9_.-]`.
    #[error("unsafe broker user name {0:?}")]
    BadUsername(String),
    /// A device's user name is not its id in lowercase hex.
    #[error("device user name {0:?} is not a device id in lowercase hex")]
    NotDeviceId(String),
    /// The same user name appears twice.
    #[error("duplicate broker user {0:?}")]
    DuplicateUser(String),
    /// The configuration directory's path cannot be written into a Mosquitto config line.
    #[error("unsafe path for a Mosquitto config line: {0:?}")]
    UnsafePath(PathBuf),
    /// Port 0 is not a port a broker can be configured to listen on.
    #[error("port 0 is not a listening port")]
    BadPort,
    /// The OS account to run the broker as is not a plain account name.
    #[error("unsafe account name {0:?}")]
    BadAccount(String),
    /// The pid cannot be the broker's (0, 1, or out of range).
    #[error("pid {0} cannot be a broker")]
    BadPid(u32),
    /// No process has this pid, or it has exited (a zombie).
    #[error("no running process with pid {0}")]
    NoSuchProcess(u32),
    /// The process with this pid is not Mosquitto.
    #[error("pid {pid} is {comm:?}, not mosquitto")]
    NotMosquitto {
        /// The pid given.
        pid: u32,
        /// The process's command name.
        comm: String,
    },
    /// `kill -HUP` could not be run or failed.
    #[error("could not signal pid {pid}: {reason}")]
    Signal {
        /// The pid given.
        pid: u32,
        /// What went wrong.
        reason: String,
    },
}

/// What a broker user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The C2 server: reads every device's server-bound topic, writes every device topic.
    Server,
    /// A device: reads its own command topic, writes its own server-bound topic.
    Device,
}

/// One broker account. `username` is the id in hex for devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUser {
    /// The MQTT user name.
    pub username: String,
    /// The password hash in Mosquitto's password-file format (never the password).
    pub password_hash: String,
    /// What the user may do.
    pub role: Role,
}

impl BrokerUser {
    /// The account of `device` (user name: its id in hex).
    pub fn device(device: DeviceId, password_hash: String) -> BrokerUser {
        BrokerUser {
            username: device.to_hex(),
            password_hash,
            role: Role::Device,
        }
    }
}

/// A fresh random broker password: 24 bytes from the OS generator (192 bits), as 32
/// base64url characters.
pub fn new_password() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; PASSWORD_BYTES]);
    OsRng.fill_bytes(bytes.as_mut());
    // Room for the whole encoding up front, so the buffer never reallocates (a reallocation
    // would leave a copy of the password behind, unzeroed).
    let mut out = Zeroizing::new(String::with_capacity(2 * PASSWORD_BYTES));
    URL_SAFE_NO_PAD.encode_string(bytes.as_ref(), &mut out);
    out
}

/// Hashes `password` in Mosquitto 2's password-file format (`$7$`, PBKDF2-SHA512) with a
/// random salt and [`PBKDF2_ITERATIONS`].
pub fn hash_password(password: &str) -> Result<String, AclError> {
    hash_password_with(password, PBKDF2_ITERATIONS)
}

/// [`hash_password`] with another iteration count (1 to [`MAX_PBKDF2_ITERATIONS`]).
pub fn hash_password_with(password: &str, iterations: u32) -> Result<String, AclError> {
    if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
        return Err(AclError::MalformedHash("iteration count out of range"));
    }
    let mut salt = [0u8; SALT_LEN];
    OsRng.try_fill_bytes(&mut salt).map_err(|_| AclError::Rng)?;
    let hash = derive(password, &salt, iterations);
    Ok(format!(
        "$7${iterations}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(hash)
    ))
}

/// Whether `password` matches `hash` (a `$7$` password-file hash, from keav or from
/// `mosquitto_passwd`); the comparison is constant-time.
pub fn verify_password(password: &str, hash: &str) -> Result<bool, AclError> {
    let parsed = parse_hash(hash)?;
    let derived = derive(password, &parsed.salt, parsed.iterations);
    Ok(bool::from(derived.ct_eq(&parsed.hash)))
}

fn derive(password: &str, salt: &[u8], iterations: u32) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, iterations, &mut out);
    out
}

/// A parsed `$7$` hash.
struct ParsedHash {
    iterations: u32,
    salt: Vec<u8>,
    hash: [u8; HASH_LEN],
}

/// Parses `$7$<iterations>$<base64 salt>$<base64 hash>` strictly: decimal iterations in
/// range, canonical padded base64, a non-empty salt of at most 64 bytes, a 64-byte hash.
fn parse_hash(s: &str) -> Result<ParsedHash, AclError> {
    if s.len() > 256 {
        return Err(AclError::MalformedHash("too long"));
    }
    let rest = s
        .strip_prefix("$7$")
        .ok_or(AclError::MalformedHash("not a $7$ (PBKDF2-SHA512) hash"))?;
    let mut parts = rest.split('$');
    let (Some(iter), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AclError::MalformedHash(
            "expected $7$<iterations>$<salt>$<hash>",
        ));
    };
    if iter.is_empty() || iter.len() > 7 || !iter.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AclError::MalformedHash("iteration count is not a number"));
    }
    let iterations: u32 = iter
        .parse()
        .map_err(|_| AclError::MalformedHash("iteration count is not a number"))?;
    if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
        return Err(AclError::MalformedHash("iteration count out of range"));
    }
    let salt = STANDARD
        .decode(salt)
        .map_err(|_| AclError::MalformedHash("salt is not base64"))?;
    if salt.is_empty() || salt.len() > 64 {
        return Err(AclError::MalformedHash("salt length"));
    }
    let hash: [u8; HASH_LEN] = STANDARD
        .decode(hash)
        .map_err(|_| AclError::MalformedHash("hash is not base64"))?
        .try_into()
        .map_err(|_| AclError::MalformedHash("hash is not 64 bytes"))?;
    Ok(ParsedHash {
        iterations,
        salt,
        hash,
    })
}

/// Where and how a fleet's Mosquitto runs.
#[derive(Debug, Clone)]
pub struct MosquittoConfig {
    /// Directory holding `mosquitto.conf`, `passwd` and `acl`.
    pub dir: PathBuf,
    /// Loopback port to listen on.
    pub port: u16,
    /// The fleet's topics.
    pub topics: Topics,
    /// The OS account Mosquitto switches to when started as root (its `user` option;
    /// `None`: Mosquitto's default, `mosquitto`). It must be able to read the 0600 files, so
    /// it must be the account that writes them: when keav runs as root and starts the broker
    /// itself, that is `root` (Mosquitto warns). A broker started by an ordinary account
    /// ignores the option and runs as that account.
    pub run_as: Option<String>,
}

/// The files [`MosquittoConfig::write`] produced.
#[derive(Debug, Clone)]
pub struct MosquittoFiles {
    /// The broker's configuration (`mosquitto -c` this).
    pub conf: PathBuf,
    /// The password file.
    pub passwd: PathBuf,
    /// The ACL file.
    pub acl: PathBuf,
}

impl MosquittoConfig {
    /// The configuration of `topics`' fleet in `dir`, listening on 127.0.0.1:`port`, with
    /// Mosquitto's default account ([`MosquittoConfig::run_as`] `None`).
    pub fn new(dir: impl Into<PathBuf>, port: u16, topics: Topics) -> MosquittoConfig {
        MosquittoConfig {
            dir: dir.into(),
            port,
            topics,
            run_as: None,
        }
    }

    /// Writes the configuration for exactly `users` (anyone else, and anonymous clients,
    /// are refused), each file replaced atomically. The password file goes first, so a
    /// broker reloading in between never gives a removed user back its account.
    pub fn write(&self, users: &[BrokerUser]) -> Result<MosquittoFiles, AclError> {
        check_users(users)?;
        let passwd_text = render_passwd(users)?;
        let acl_text = self.render_acl(users)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io_err(&self.dir, e))?;
        let dir = fs::canonicalize(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let conf_text = self.render_conf(&dir)?;
        let passwd = replace_file(&dir, PASSWD_FILE, passwd_text.as_bytes())?;
        let acl = replace_file(&dir, ACL_FILE, acl_text.as_bytes())?;
        let conf = replace_file(&dir, CONF_FILE, conf_text.as_bytes())?;
        Ok(MosquittoFiles { conf, passwd, acl })
    }

    /// Writes the files for `users` and makes the running broker `pid` apply them
    /// (revoked users can neither publish nor subscribe afterwards): see [`reload`].
    pub fn apply(&self, users: &[BrokerUser], pid: u32) -> Result<MosquittoFiles, AclError> {
        let files = self.write(users)?;
        reload(pid)?;
        Ok(files)
    }

    /// The text of `mosquitto.conf` for a configuration directory at the absolute path `dir`.
    pub fn render_conf(&self, dir: &Path) -> Result<String, AclError> {
        if self.port == 0 {
            return Err(AclError::BadPort);
        }
        let d = config_path(dir)?;
        let mut s = String::new();
        s.push_str(
            "# Generated by keav (keav-c2 acl): replaced on every change, do not edit.\n\
             per_listener_settings false\n",
        );
        let _ = writeln!(s, "listener {} 127.0.0.1", self.port);
        s.push_str("allow_anonymous false\n");
        let _ = writeln!(s, "password_file {d}/{PASSWD_FILE}");
        let _ = writeln!(s, "acl_file {d}/{ACL_FILE}");
        s.push_str(
            "use_username_as_clientid true\n\
             check_retain_source true\n\
             persistence false\n",
        );
        if let Some(user) = &self.run_as {
            if !safe_name(user) {
                return Err(AclError::BadAccount(user.clone()));
            }
            let _ = writeln!(s, "user {user}");
        }
        Ok(s)
    }

    /// The text of the ACL file for `users` (checked as [`MosquittoConfig::write`] does).
    pub fn render_acl(&self, users: &[BrokerUser]) -> Result<String, AclError> {
        check_users(users)?;
        let server = self.topics.server().to_hex();
        let mut s = String::from(
            "# Generated by keav (keav-c2 acl): replaced on every change, do not edit.\n\
             # One block per user, literal topics only; a user without a block has no rights.\n",
        );
        for u in users {
            let _ = writeln!(s, "\nuser {}", u.username);
            match u.role {
                Role::Server => {
                    let _ = writeln!(s, "topic read {ROOT}/{server}/s/+");
                    let _ = writeln!(s, "topic write {ROOT}/{server}/d/+");
                }
                Role::Device => {
                    let _ = writeln!(s, "topic read {ROOT}/{server}/d/{}", u.username);
                    let _ = writeln!(s, "topic write {ROOT}/{server}/s/{}", u.username);
                }
            }
        }
        Ok(s)
    }
}

/// The text of the password file for `users` (checked as [`MosquittoConfig::write`] does).
pub fn render_passwd(users: &[BrokerUser]) -> Result<String, AclError> {
    check_users(users)?;
    let mut s = String::new();
    for u in users {
        let _ = writeln!(s, "{}:{}", u.username, u.password_hash);
    }
    Ok(s)
}

/// Makes the running broker `pid` reload its password and ACL files (SIGHUP, sent with the
/// `kill` command: the workspace forbids `unsafe`). On Linux the pid is first checked to be
/// a live process named `mosquitto`, so a stale pid never signals another program.
///
/// Returns once the signal is sent; the broker reloads, and disconnects the clients its new
/// files no longer admit, on its next main-loop pass.
pub fn reload(pid: u32) -> Result<(), AclError> {
    if pid <= 1 || i32::try_from(pid).is_err() {
        return Err(AclError::BadPid(pid));
    }
    if Path::new("/proc/self").exists() {
        check_is_mosquitto(pid)?;
    }
    let out = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .output()
        .map_err(|e| AclError::Signal {
            pid,
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(AclError::Signal {
            pid,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn check_is_mosquitto(pid: u32) -> Result<(), AclError> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = match fs::read_to_string(proc_dir.join("comm")) {
        Ok(c) => c.trim_end().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AclError::NoSuchProcess(pid)),
        Err(e) => return Err(io_err(&proc_dir, e)),
    };
    if comm != "mosquitto" {
        return Err(AclError::NotMosquitto { pid, comm });
    }
    // /proc/<pid>/stat: "<pid> (<comm>) <state> ..."; a zombie ('Z') or dead ('X') broker
    // would take the signal and reload nothing.
    let stat = fs::read_to_string(proc_dir.join("stat")).map_err(|e| io_err(&proc_dir, e))?;
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    match state {
        Some('Z') | Some('X') | None => Err(AclError::NoSuchProcess(pid)),
        Some(_) => Ok(()),
    }
}

/// The directory's `mosquitto.conf`.
pub fn conf_path(dir: &Path) -> PathBuf {
    dir.join(CONF_FILE)
}

/// Checks every user before anything is written: safe, unique names; devices named by
/// their id in lowercase hex; well-formed hashes.
fn check_users(users: &[BrokerUser]) -> Result<(), AclError> {
    let mut seen = std::collections::HashSet::new();
    for u in users {
        if !safe_name(&u.username) {
            return Err(AclError::BadUsername(u.username.clone()));
        }
        if u.role == Role::Device
            && DeviceId::from_hex(&u.username).map(|d| d.to_hex()) != Some(u.username.clone())
        {
            return Err(AclError::NotDeviceId(u.username.clone()));
        }
        if !seen.insert(u.username.as_str()) {
            return Err(AclError::DuplicateUser(u.username.clone()));
        }
        parse_hash(&u.password_hash)?;
    }
    Ok(())
}

/// A name safe in a password-file line (no `:`), an ACL line and an ACL topic (no `+`, `#`,
/// `/`, spaces or control characters).
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// `dir` as text for a config line: UTF-8, absolute, without whitespace, control characters
/// or `#`.
fn config_path(dir: &Path) -> Result<&str, AclError> {
    match dir.to_str() {
        Some(d)
            if dir.is_absolute()
                && !d
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '#') =>
        {
            Ok(d.trim_end_matches('/'))
        }
        _ => Err(AclError::UnsafePath(dir.to_path_buf())),
    }
}

fn io_err(path: &Path, source: io::Error) -> AclError {
    AclError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `dir/name` with `contents` atomically, mode 0600: a temporary file in the same
/// directory, written and fsynced, renamed over the old one, then the directory fsynced so
/// the rename survives a crash. A reader sees the old file or the new one, never a mix.
pub fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf, AclError> {
    let target = dir.join(name);
    let mut nonce = [0u8; 8];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|_| AclError::Rng)?;
    let mut tmp_name = format!(".{name}.tmp-");
    for b in nonce {
        let _ = write!(tmp_name, "{b:02x}");
    }
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask can only clear bits, but be explicit about the final mode.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&target, e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made on this machine with `mosquitto_passwd -c -b f u1 hunter2` (Mosquitto 2.0.11).
    const MOSQUITTO_PASSWD_HUNTER2: &str = "$7$101$J8HxYbJ1C4gOM3WV$/ZA+zq64ffnr8ZU/g1pers0TfgA+aMAjnU/b0xUM9/pp43VRzG9IbytgjISryhy+jwwKC4s9ejUKxBojz1O16w==";

    fn topics() -> Topics {
        Topics::new(DeviceId([0x11; 8]))
    }

    fn user(name: &str, role: Role) -> BrokerUser {
        BrokerUser {
            username: name.to_owned(),
            password_hash: hash_password("pw").unwrap(),
            role,
        }
    }

    #[test]
    fn verifies_a_hash_made_by_mosquitto_passwd() {
        assert!(verify_password("hunter2", MOSQUITTO_PASSWD_HUNTER2).unwrap());
        assert!(!verify_password("hunter3", MOSQUITTO_PASSWD_HUNTER2).unwrap());
        assert!(!verify_password("", MOSQUITTO_PASSWD_HUNTER2).unwrap());
    }

    #[test]
    fn hash_has_mosquitto_format_and_random_salt() {
        let h = hash_password("correct horse").unwrap();
        let parts: Vec<&str> = h.split('$').collect();
        assert_eq!(parts.len(), 5, "{h}");
        assert_eq!(parts[0], "");
        assert_eq!(parts[1], "7");
        assert_eq!(parts[2], PBKDF2_ITERATIONS.to_string());
        assert_eq!(STANDARD.decode(parts[3]).unwrap().len(), SALT_LEN);
        assert_eq!(STANDARD.decode(parts[4]).unwrap().len(), HASH_LEN);
        assert!(!h.contains("correct horse"));
        assert!(verify_password("correct horse", &h).unwrap());
        assert!(!verify_password("correct horsf", &h).unwrap());
        let h2 = hash_password("correct horse").unwrap();
        assert_ne!(h, h2, "same password, same salt");
        let h3 = hash_password_with("correct horse", 1000).unwrap();
        assert!(h3.starts_with("$7$1000$"));
        assert!(verify_password("correct horse", &h3).unwrap());
        assert!(hash_password_with("x", 0).is_err());
        assert!(hash_password_with("x", MAX_PBKDF2_ITERATIONS + 1).is_err());
    }

    #[test]
    fn malformed_hashes_are_refused() {
        let good = MOSQUITTO_PASSWD_HUNTER2;
        let bad = [
            "",
            "hunter2",
            "$6$J8HxYbJ1C4gOM3WV$abc",
            &good.replace("$7$101$", "$7$0$"),
            &good.replace("$7$101$", "$7$$"),
            &good.replace("$7$101$", "$7$-1$"),
            &good.replace("$7$101$", "$7$+101$"),
            &good.replace("$7$101$", "$7$99999999999$"),
            &good.replace("$7$101$", "$7$1000001$"),
            &good.replace("J8HxYbJ1C4gOM3WV", ""),
            &good.replace("J8HxYbJ1C4gOM3WV", "J8Hx!bJ1C4gOM3WV"),
            &good.replace("==", ""),
            &good[..good.len() - 8],
            &format!("{good}$"),
            &format!("{good}\nevil:$7$1$AAAA$AAAA"),
        ];
        for b in bad {
            assert!(
                matches!(
                    verify_password("hunter2", b),
                    Err(AclError::MalformedHash(_))
                ),
                "{b:?} accepted"
            );
        }
    }

    #[test]
    fn new_passwords_are_long_random_and_printable() {
        let a = new_password();
        let b = new_password();
        assert_eq!(a.len(), 32);
        assert_eq!(URL_SAFE_NO_PAD.decode(a.as_bytes()).unwrap().len(), 24);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_ne!(*a, *b);
    }

    #[test]
    fn acl_gives_each_role_exactly_its_topics() {
        let cfg = MosquittoConfig::new("/x", 18830, topics());
        let users = [
            user("c2server", Role::Server),
            user("aaaaaaaaaaaaaaaa", Role::Device),
            user("0123456789abcdef", Role::Device),
        ];
        let acl = cfg.render_acl(&users).unwrap();
        let rules: Vec<&str> = acl
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            rules,
            [
                "user c2server",
                "topic read keav/c2/1111111111111111/s/+",
                "topic write keav/c2/1111111111111111/d/+",
                "user aaaaaaaaaaaaaaaa",
                "topic read keav/c2/1111111111111111/d/aaaaaaaaaaaaaaaa",
                "topic write keav/c2/1111111111111111/s/aaaaaaaaaaaaaaaa",
                "user 0123456789abcdef",
                "topic read keav/c2/1111111111111111/d/0123456789abcdef",
                "topic write keav/c2/1111111111111111/s/0123456789abcdef",
            ]
        );
        assert!(!acl.contains("pattern"));
        assert!(!acl.contains('%'));
        // The device's literal topics are the topic scheme's.
        let d = DeviceId::from_hex("0123456789abcdef").unwrap();
        assert!(acl.contains(&format!("topic read {}\n", topics().to_device(d))));
        assert!(acl.contains(&format!("topic write {}\n", topics().to_server(d))));
        assert!(acl.contains(&format!("topic read {}\n", topics().server_filter())));
    }

    #[test]
    fn passwd_has_one_line_per_user_and_no_password() {
        let h = hash_password("s3cret-password").unwrap();
        let users = [
            BrokerUser::device(DeviceId([0xab; 8]), h.clone()),
            user("c2server", Role::Server),
        ];
        let text = render_passwd(&users).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], format!("abababababababab:{h}"));
        assert!(lines[1].starts_with("c2server:$7$101$"));
        assert!(!text.contains("s3cret"));
    }

    #[test]
    fn conf_listens_on_loopback_only_and_refuses_anonymous() {
        let mut cfg = MosquittoConfig::new("/x", 18830, topics());
        let conf = cfg.render_conf(Path::new("/srv/keav/broker")).unwrap();
        let lines: Vec<&str> = conf
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            lines,
            [
                "per_listener_settings false",
                "listener 18830 127.0.0.1",
                "allow_anonymous false",
                "password_file /srv/keav/broker/passwd",
                "acl_file /srv/keav/broker/acl",
                "use_username_as_clientid true",
                "check_retain_source true",
                "persistence false",
            ]
        );
        cfg.run_as = Some("keav".into());
        assert!(cfg
            .render_conf(Path::new("/srv"))
            .unwrap()
            .ends_with("user keav\n"));
        cfg.run_as = Some("keav\nallow_anonymous true".into());
        assert!(matches!(
            cfg.render_conf(Path::new("/srv")),
            Err(AclError::BadAccount(_))
        ));
        cfg.run_as = None;
        for p in ["relative/dir", "/with space", "/new\nline", "/hash#x"] {
            assert!(
                matches!(cfg.render_conf(Path::new(p)), Err(AclError::UnsafePath(_))),
                "{p:?}"
            );
        }
        cfg.port = 0;
        assert!(matches!(
            cfg.render_conf(Path::new("/srv")),
            Err(AclError::BadPort)
        ));
    }

    #[test]
    fn users_are_checked_before_rendering() {
        let cfg = MosquittoConfig::new("/x", 18830, topics());
        let bad_names = [
            "",
            "a b",
            "a:b",
            "a/b",
            "a+b",
            "a#",
            "x\nuser evil",
            &"a".repeat(65),
        ];
        for n in bad_names {
            assert!(
                matches!(
                    cfg.render_acl(&[user(n, Role::Server)]),
                    Err(AclError::BadUsername(_))
                ),
                "{n:?}"
            );
        }
        for n in ["c2server", "ABABABABABABABAB", "zzzzzzzzzzzzzzzz", "abab"] {
            assert!(
                matches!(
                    cfg.render_acl(&[user(n, Role::Device)]),
                    Err(AclError::NotDeviceId(_))
                ),
                "{n:?}"
            );
        }
        let dup = [
            user("abababababababab", Role::Device),
            user("abababababababab", Role::Device),
        ];
        assert!(matches!(
            cfg.render_acl(&dup),
            Err(AclError::DuplicateUser(_))
        ));
        let mut planted = user("abababababababab", Role::Device);
        planted.password_hash.push_str("\nevil:$7$101$AAAA$AAAA");
        assert!(matches!(
            render_passwd(&[planted]),
            Err(AclError::MalformedHash(_))
        ));
        let mut plain = user("abababababababab", Role::Device);
        plain.password_hash = "hunter2".into();
        assert!(matches!(
            cfg.render_acl(&[plain]),
            Err(AclError::MalformedHash(_))
        ));
    }

    #[test]
    fn replace_file_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = replace_file(dir.path(), "passwd", b"one\n").unwrap();
        assert_eq!(p, dir.path().join("passwd"));
        assert_eq!(fs::read(&p).unwrap(), b"one\n");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A reader that opened the old file keeps reading the old file: the new one was
        // renamed over it, not written into it.
        let mut old = File::open(&p).unwrap();
        let ino_before = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&p).unwrap());
        replace_file(dir.path(), "passwd", b"two, longer\n").unwrap();
        let mut seen = String::new();
        io::Read::read_to_string(&mut old, &mut seen).unwrap();
        assert_eq!(seen, "one\n");
        assert_eq!(fs::read(&p).unwrap(), b"two, longer\n");
        let ino_after = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&p).unwrap());
        assert_ne!(ino_before, ino_after);
        // An existing file with a wider mode is replaced by a 0600 one.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        replace_file(dir.path(), "passwd", b"three\n").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["passwd"]);
        // A failed write leaves the old file alone and no temporary behind.
        assert!(replace_file(&dir.path().join("missing"), "passwd", b"x").is_err());
        assert_eq!(fs::read(&p).unwrap(), b"three\n");
    }

    #[test]
    fn write_creates_private_files_for_exactly_the_users() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MosquittoConfig::new(dir.path().join("broker"), 18830, topics());
        let users = [
            user("c2server", Role::Server),
            user("abababababababab", Role::Device),
        ];
        let files = cfg.write(&users).unwrap();
        let root = fs::canonicalize(dir.path().join("broker")).unwrap();
        assert_eq!(files.conf, conf_path(&root));
        assert_eq!(files.passwd, root.join("passwd"));
        assert_eq!(files.acl, root.join("acl"));
        for f in [&files.conf, &files.passwd, &files.acl] {
            assert_eq!(
                fs::metadata(f).unwrap().permissions().mode() & 0o777,
                0o600,
                "{f:?}"
            );
        }
        assert_eq!(
            fs::metadata(&root).unwrap().permissions().mode() & 0o077,
            0,
            "directory open to others"
        );
        assert_eq!(
            fs::read_to_string(&files.passwd).unwrap(),
            render_passwd(&users).unwrap()
        );
        assert_eq!(
            fs::read_to_string(&files.acl).unwrap(),
            cfg.render_acl(&users).unwrap()
        );
        let conf = fs::read_to_string(&files.conf).unwrap();
        assert!(conf.contains(&format!("password_file {}\n", files.passwd.display())));
        // Removing a user rewrites both files without it.
        cfg.write(&users[..1]).unwrap();
        assert!(!fs::read_to_string(&files.passwd)
            .unwrap()
            .contains("abababababababab"));
        assert!(!fs::read_to_string(&files.acl)
            .unwrap()
            .contains("abababababababab"));
        // A bad user list writes nothing.
        let before = fs::read_to_string(&files.passwd).unwrap();
        let mut bad = users.to_vec();
        bad.push(user("not hex", Role::Device));
        assert!(cfg.write(&bad).is_err());
        assert_eq!(fs::read_to_string(&files.passwd).unwrap(), before);
    }

    #[test]
    fn reload_refuses_pids_that_are_not_a_live_mosquitto() {
        assert!(matches!(reload(0), Err(AclError::BadPid(0))));
        assert!(matches!(reload(1), Err(AclError::BadPid(1))));
        assert!(matches!(reload(u32::MAX), Err(AclError::BadPid(_))));
        // This test process is alive and is not mosquitto: it must not be signalled.
        assert!(matches!(
            reload(std::process::id()),
            Err(AclError::NotMosquitto { .. })
        ));
        // A pid above the kernel's maximum names no process.
        assert!(matches!(
            reload(i32::MAX as u32),
            Err(AclError::NoSuchProcess(_))
        ));
    }
}
