//! The scenarios of a `keav bench` run. Each `run` pushes its rows into the report as it
//! measures them and returns [`crate::BenchError::Cancelled`] when asked to stop.

pub mod broker;
pub mod c2;
pub mod cpu;
pub mod datapath;
pub mod latency;
pub mod memory;
pub mod wire;
