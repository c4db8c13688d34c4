//! Durable store (placeholder, being written).
