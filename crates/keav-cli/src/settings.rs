//! Where the device store lives, the optional TOML config file, and the pairing code.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// `config.toml`: defaults for every command. Command-line flags win.
///
/// ```toml
/// store = "/var/lib/keav/device.redb"   # the device store
/// mode = "normal"                       # no-continuity | normal | paranoid
/// verify_every = 10                     # N for normal mode
/// backend = "cpace"                     # cpace | smp
/// code_file = "/etc/keav/pairing-code"  # the verification secret (file, first line)
/// handshake_timeout_secs = 10
/// max_failures = 5                      # K: failed verifications before lockout
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Device store path.
    pub store: Option<PathBuf>,
    /// Mode name.
    pub mode: Option<String>,
    /// N for normal mode.
    pub verify_every: Option<u32>,
    /// Equality test name.
    pub backend: Option<String>,
    /// File holding the pairing code.
    pub code_file: Option<PathBuf>,
    /// Handshake deadline.
    pub handshake_timeout_secs: Option<u64>,
    /// Lockout threshold K.
    pub max_failures: Option<u32>,
}

impl FileConfig {
    /// Loads `path`, or `$KEAV_CONFIG`, or `$XDG_CONFIG_HOME/keav/config.toml` /
    /// `~/.config/keav/config.toml` when it exists; an absent default file is an empty config.
    pub fn load(path: Option<&Path>) -> Result<FileConfig> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => match std::env::var_os("KEAV_CONFIG") {
                Some(p) => (PathBuf::from(p), true),
                None => match config_dir() {
                    Some(d) => (d.join("keav").join("config.toml"), false),
                    None => return Ok(FileConfig::default()),
                },
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(FileConfig::default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

fn config_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
}

/// The store path: `--store`, the config file, `$KEAV_STORE`, then
/// `$XDG_DATA_HOME/keav/device.redb` (or `~/.local/share/keav/device.redb`).
pub fn store_path(flag: Option<&Path>, file: &FileConfig) -> Result<PathBuf> {
    if let Some(p) = flag.or(file.store.as_deref()) {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KEAV_STORE") {
        return Ok(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    match base {
        Some(b) => Ok(b.join("keav").join("device.redb")),
        None => bail!("no store path: pass --store PATH or set KEAV_STORE"),
    }
}

/// Where the pairing code comes from. Never from the command line itself, so it does not end
/// up in shell history or `ps`.
#[derive(Debug, Clone)]
pub enum CodeSource {
    /// No code: verification runs unbound (trust on first use).
    None,
    /// First line of a file.
    File(PathBuf),
    /// Asked on the terminal without echo.
    Prompt,
    /// The `KEAV_PAIRING_CODE` environment variable.
    Env,
}

impl CodeSource {
    /// Reads the code. Empty codes are refused (use no code instead).
    pub fn read(&self) -> Result<Option<Vec<u8>>> {
        let code = match self {
            CodeSource::None => return Ok(None),
            CodeSource::File(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading pairing code file {}", p.display()))?;
                text.lines().next().unwrap_or("").trim().to_string()
            }
            CodeSource::Prompt => rpassword::prompt_password("pairing code: ")
                .context("reading the pairing code from the terminal")?
                .trim()
                .to_string(),
            CodeSource::Env => std::env::var("KEAV_PAIRING_CODE")
                .context("KEAV_PAIRING_CODE is not set")?
                .trim()
                .to_string(),
        };
        if code.is_empty() {
            bail!("the pairing code is empty");
        }
        Ok(Some(code.into_bytes()))
    }
}
