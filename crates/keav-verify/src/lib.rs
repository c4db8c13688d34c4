//! Maliciously secure equality tests for KEAV (placeholder, being written).

use thiserror::Error;

/// Errors of the equality tests.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The two inputs differ (or the peer does not know the secret).
    #[error("inputs are not equal")]
    NotEqual,
}
