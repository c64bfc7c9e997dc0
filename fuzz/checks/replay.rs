//! Corpus replay for the stable test suites: runs a target's checks over every file of its
//! corpus (`fuzz/corpus/<target>/`, which must exist and hold inputs) and of its regressions
//! (`fuzz/regressions/<target>/`, optional), so `cargo test --workspace` replays what the fuzzer
//! found without nightly. Included with `#[path]` by each crate's `tests/fuzz_corpus.rs`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Replays `target`'s inputs through `check`; fails listing every input that panicked.
/// `manifest_dir` is the including crate's `CARGO_MANIFEST_DIR` (a sibling of `fuzz/`).
pub fn replay(manifest_dir: &str, target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(manifest_dir).join("..").join("fuzz");
    let mut inputs = inputs(&fuzz.join("corpus").join(target));
    assert!(
        !inputs.is_empty(),
        "no corpus in fuzz/corpus/{target}: run from a full checkout"
    );
    inputs.extend(inputs_if_any(&fuzz.join("regressions").join(target)));
    let failed: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("corpus file is readable");
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {target} fail its checks (see the panics above):\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}

/// The input files of `dir`, sorted; dot files and `*.md` notes are not inputs.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            !name.starts_with('.') && !name.ends_with(".md")
        })
        .collect();
    files.sort();
    files
}

fn inputs_if_any(dir: &Path) -> Vec<PathBuf> {
    if dir.is_dir() {
        inputs(dir)
    } else {
        Vec::new()
    }
}
