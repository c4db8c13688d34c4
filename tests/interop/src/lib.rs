//! bzrtp interop harness (placeholder).
