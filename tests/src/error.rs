//! The lab's one error type: a message that says which step failed and what the process printed.

use std::fmt;

/// A lab step that failed (namespace setup, a service that did not become ready, ...).
#[derive(Clone, PartialEq, Eq)]
pub struct LabError(pub String);

pub type Result<T, E = LabError> = std::result::Result<T, E>;

impl LabError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Debug prints the message as is: `expect()` shows it, and it spans lines (process output).
impl fmt::Debug for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LabError {}

impl From<std::io::Error> for LabError {
    fn from(err: std::io::Error) -> Self {
        Self(format!("io: {err}"))
    }
}
