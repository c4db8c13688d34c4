//! `report.md` and the stdout summary.

use std::path::PathBuf;

use super::Report;

/// Renders the whole report.
pub fn render(r: &Report, plots: &[PathBuf], plot_errors: &[String]) -> String {
    let _ = (plots, plot_errors);
    format!("# keav bench report\n\n{}\n", r.meta.command)
}

/// The stdout summary.
pub fn summary(r: &Report) -> String {
    format!("keav bench: {}", r.meta.command)
}
