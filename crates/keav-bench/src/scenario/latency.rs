//! The `latency` scenario.

use crate::run::Ctx;
use crate::BenchError;

/// Runs the scenario, pushing rows into `ctx.report`.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    Err(BenchError::Report(
        "the latency scenario is not implemented yet".into(),
    ))
}
