//! Reading a YAML file into a typed value, with every error as `file:line:column: message`.

use std::path::Path;

use serde::de::DeserializeOwned;

/// A YAML file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum YamlFileError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Reads and parses `path`; errors name it as it was given.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, YamlFileError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| YamlFileError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&file, &text)
}

/// Parses `text`; `file` labels errors.
pub fn parse<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, YamlFileError> {
    serde_yaml_ng::from_str(text).map_err(|err| {
        let (line, column) = err.location().map_or((0, 0), |at| (at.line(), at.column()));
        YamlFileError::Invalid {
            file: file.to_owned(),
            line,
            column,
            message: strip_position(&err.to_string()),
        }
    })
}

/// serde_yaml_ng appends " at line L column C"; the position is printed up front instead.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}
