//! Output for people (a table, the default) and for scripts (`-o json`, `-o yaml`). Colour
//! only on a terminal, and never with `NO_COLOR` set: a pipe or a file gets plain text.

use std::fmt::Write as _;
use std::io::IsTerminal;

use serde::Serialize;

use super::line::LineExplanation;
use super::trace::{AddressTrace, Explanation};

/// `-o`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Whether to colour verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colour(pub bool);

impl Colour {
    /// On when stdout is a terminal and `NO_COLOR` is unset.
    pub fn for_stdout() -> Self {
        Colour(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }

    /// `verdict`, green, yellow or red.
    pub fn verdict(self, verdict: &str) -> String {
        let code = match verdict {
            "allow" => "32",
            "audit" => "33",
            _ => "31",
        };
        if self.0 {
            format!("\x1b[1;{code}m{verdict}\x1b[0m")
        } else {
            verdict.to_owned()
        }
    }
}

/// A value as JSON (one document and a newline) or YAML.
pub fn structured(value: &impl Serialize, output: Output) -> Result<String, String> {
    match output {
        Output::Yaml => serde_yaml_ng::to_string(value).map_err(|e| e.to_string()),
        _ => serde_json::to_string_pretty(value)
            .map(|mut text| {
                text.push('\n');
                text
            })
            .map_err(|e| e.to_string()),
    }
}

/// An explanation as a table: the pod, then per address each step in the gateway's order.
pub fn explanation_table(explanation: &Explanation, colour: Colour) -> String {
    let mut out = String::new();
    let pod = &explanation.pod;
    let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
    let labels = |labels: &std::collections::BTreeMap<String, String>| {
        if labels.is_empty() {
            "(none)".to_owned()
        } else {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let policies: Vec<String> = explanation
        .policies
        .iter()
        .map(|p| format!("{} ({})", p.policy, p.mode))
        .collect();
    let rows = [
        (
            "VERDICT",
            format!(
                "{} ({})",
                colour.verdict(explanation.verdict.as_str()),
                explanation.reason
            ),
        ),
        (
            "POD",
            format!("{}/{} ({})", pod.namespace, pod.name, ips.join(", ")),
        ),
        ("LABELS", labels(&pod.labels)),
        ("NAMESPACE", labels(&pod.namespace_labels)),
        (
            "POLICIES",
            if policies.is_empty() {
                "(none select it)".to_owned()
            } else {
                policies.join(", ")
            },
        ),
        ("TO", explanation.to.clone()),
    ];
    for (key, value) in rows {
        let _ = writeln!(out, "{key:<10} {value}");
    }
    for trace in &explanation.addresses {
        out.push('\n');
        address_table(&mut out, trace, colour);
    }
    out
}

fn address_table(out: &mut String, trace: &AddressTrace, colour: Colour) {
    let _ = writeln!(
        out,
        "{} → {} ({}{})",
        trace.destination,
        colour.verdict(trace.verdict.as_str()),
        trace.reason,
        trace
            .detail
            .as_ref()
            .map_or(String::new(), |d| format!(", {d}"))
    );
    let rows: Vec<[String; 4]> = trace
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            [
                (i + 1).to_string(),
                step.step.clone(),
                step.outcome.clone(),
                step.says.clone(),
            ]
        })
        .collect();
    table(out, ["#", "STEP", "OUTCOME", "WHY"], &rows);
}

/// Aligned columns; the last one runs free.
fn table<const N: usize>(out: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, header.to_vec());
    for row in rows {
        line(out, row.iter().map(String::as_str).collect());
    }
}

/// Decision lines explained, one block each.
pub fn lines_table(explained: &[LineExplanation], colour: Colour) -> String {
    let mut out = String::new();
    for (i, line) in explained.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut rows = vec![
            (
                "VERDICT",
                format!(
                    "{} ({}{})",
                    colour.verdict(&line.verdict),
                    line.reason,
                    line.detail
                        .as_ref()
                        .map_or(String::new(), |d| format!(", {d}"))
                ),
            ),
            (
                "POD",
                line.pod.clone().unwrap_or_else(|| "(unknown)".to_owned()),
            ),
            ("TO", line.destination.to_string()),
            ("WHY", line.says.clone()),
        ];
        for note in &line.notes {
            rows.push(("NOTE", note.clone()));
        }
        if let Some(command) = &line.explain_command {
            rows.push(("NOW", command.clone()));
        }
        for (key, value) in rows {
            let _ = writeln!(out, "{key:<8} {value}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_colour_codes_unless_asked() {
        assert_eq!(Colour(false).verdict("deny"), "deny");
        assert_eq!(Colour(true).verdict("allow"), "\x1b[1;32mallow\x1b[0m");
        let mut out = String::new();
        table(
            &mut out,
            ["#", "WHY"],
            &[
                ["1".to_owned(), "a b".to_owned()],
                ["10".to_owned(), "c".to_owned()],
            ],
        );
        assert_eq!(out, "#   WHY\n1   a b\n10  c\n");
    }
}
