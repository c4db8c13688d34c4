//! The crate's one error type, with a nested category per layer.

use thiserror::Error;

/// Everything that can fail in keav-c2.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum C2Error {
    /// A key could not be made, read or used.
    #[error("key: {0}")]
    Key(#[from] crate::keys::KeyError),
    /// A message could not be parsed or its signature did not verify.
    #[error("wire: {0}")]
    Wire(#[from] crate::wire::WireError),
    /// A message was refused by replay protection (counter, window, expiry).
    #[error("replay guard: {0}")]
    Guard(#[from] crate::guard::GuardError),
    /// Broker configuration could not be generated or applied.
    #[error("broker ACL: {0}")]
    Acl(#[from] crate::acl::AclError),
    /// The fleet registry refused a change or failed.
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    /// The identity service or its client failed.
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// The C2 engine refused an operation (unknown device, no such token, not ready).
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    /// A confidential (KEAV) payload or handshake frame was refused, or its state is corrupt.
    #[error("confidential: {0}")]
    Confidential(#[from] crate::confidential::ConfError),
}
