//! The `keav` command-line tool.
fn main() {}
