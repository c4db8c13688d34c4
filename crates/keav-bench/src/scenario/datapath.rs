//! The `records` and `throughput` scenarios.

use crate::run::Ctx;
use crate::BenchError;

/// Record seal + open beside rustls and snow.
pub fn run_records(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    Err(BenchError::Report(
        "the records scenario is not implemented yet".into(),
    ))
}

/// One TCP channel's throughput on loopback.
pub fn run_throughput(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    Err(BenchError::Report(
        "the throughput scenario is not implemented yet".into(),
    ))
}
