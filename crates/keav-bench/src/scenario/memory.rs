//! The `memory` scenario.

use crate::run::Ctx;
use crate::BenchError;

/// Runs the scenario, pushing rows into `ctx.report`.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    Err(BenchError::Report(
        "the memory scenario is not implemented yet".into(),
    ))
}

/// Runs the memory worker when this process was started as one (stub until the memory
/// scenario lands): `Some(exit code)` means the process was a worker and must exit.
pub fn maybe_run_worker() -> Option<std::process::ExitCode> {
    None
}
