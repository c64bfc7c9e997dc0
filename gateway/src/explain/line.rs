//! `egressgate explain --line '{…}'` (or decision lines on stdin): why a decision line came out
//! as it did, from its own fields, and the `explain` command that asks the running gateway the
//! same question now.
//!
//! In a line's `names` the name the first message asked for (or the one a rule matched) comes
//! first when the pod resolved it; `namesTotal` is there when the list was cut at 8. So a
//! requested name missing from `names` was not resolved to that address by that pod.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::why::{self, Facts};

/// The fields of a `decision` line this reads; others (newer ones included) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecisionFields {
    event: String,
    verdict: String,
    reason: String,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    pod: Option<PodName>,
    destination: SocketAddr,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    names_total: Option<usize>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    database: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    postgresql_encryption: Option<String>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    rule: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct PodName {
    namespace: String,
    name: String,
}

/// Why one decision line came out as it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LineExplanation {
    pub verdict: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub destination: SocketAddr,
    pub says: String,
    /// What else the line's fields tell.
    pub notes: Vec<String>,
    /// Asks the running gateway the same question now (absent when the pod is unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain_command: Option<String>,
}

/// Explains one line.
pub fn explain_line(text: &str) -> Result<LineExplanation, String> {
    let fields: DecisionFields =
        serde_json::from_str(text.trim()).map_err(|e| format!("not a decision line: {e}"))?;
    if fields.event != "decision" {
        return Err(format!("a {:?} line, not a decision line", fields.event));
    }
    let pod = fields
        .pod
        .as_ref()
        .map(|pod| format!("{}/{}", pod.namespace, pod.name));
    let requested = fields.sni.clone().or_else(|| fields.host.clone());
    let first_message = match (fields.protocol.as_deref(), &fields.database, &fields.user) {
        (Some("postgresql"), Some(database), Some(user)) => Some(format!(
            "PostgreSQL startup, database {database}, user {user}"
        )),
        (Some("postgresql"), _, _) => fields
            .postgresql_encryption
            .as_ref()
            .map(|how| format!("PostgreSQL session encrypted with {how}")),
        (Some(protocol), _, _) => Some(match &requested {
            Some(name) => format!("{protocol} naming {name}"),
            None => protocol.to_owned(),
        }),
        (None, _, _) => None,
    };
    let facts = Facts {
        pod: pod.clone(),
        destination: Some(fields.destination),
        names: fields.names.clone(),
        requested: requested.clone(),
        first_message,
        policy: fields.policy.clone(),
        rule: fields.rule,
    };
    let says = why::says(&fields.reason, &fields.verdict, &facts);
    let mut notes = Vec::new();
    if let Some(total) = fields.names_total {
        notes.push(format!(
            "the pod held {total} names for {}; the line lists {} of them, the requested or \
             matched name first",
            fields.destination.ip(),
            fields.names.len()
        ));
    }
    if let Some(name) = &requested {
        let what = if fields.sni.is_some() { "SNI" } else { "Host" };
        let ip = fields.destination.ip();
        if fields.names.contains(name) {
            notes.push(format!(
                "the {what} {name} is a name this pod resolved to {ip}"
            ));
        } else {
            // A cut list still holds the requested name (first) when the pod resolved it.
            notes.push(format!(
                "the {what} {name} is not a name this pod resolved to {ip}"
            ));
        }
    }
    if let Some(detail) = &fields.detail {
        notes.push(format!(
            "detail {detail}: how the first message was refused"
        ));
    }
    let explain_command = pod.as_ref().map(|pod| {
        let mut command = format!("egressgate explain --pod {pod} --to {}", fields.destination);
        match (fields.protocol.as_deref(), &fields.sni, &fields.host) {
            (Some("tls"), Some(sni), _) => command.push_str(&format!(" --sni {sni}")),
            (Some("http"), _, Some(host)) => command.push_str(&format!(" --host {host}")),
            (Some("postgresql"), _, _) => {
                if let (Some(database), Some(user)) = (&fields.database, &fields.user) {
                    command.push_str(&format!(" --database {database} --user {user}"));
                }
            }
            (Some(protocol @ ("tls" | "http" | "tcp")), _, _) => {
                command.push_str(&format!(" --protocol {protocol}"))
            }
            _ => {}
        }
        command
    });
    Ok(LineExplanation {
        verdict: fields.verdict,
        reason: fields.reason,
        detail: fields.detail,
        pod,
        destination: fields.destination,
        says,
        notes,
        explain_command,
    })
}

/// Explains every decision line of `text` (one JSON object a line; other events and blank
/// lines are skipped). Errors name the line number.
pub fn explain_lines(text: &str) -> Result<Vec<LineExplanation>, String> {
    let mut explained = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() || !line.contains("\"decision\"") {
            continue;
        }
        explained.push(explain_line(line).map_err(|e| format!("line {}: {e}", number + 1))?);
    }
    if explained.is_empty() {
        return Err("no decision line in the input".to_owned());
    }
    Ok(explained)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNI_MISMATCH: &str = include_str!("testdata/decision_sni_mismatch.json");
    const NAMES_CUT: &str = include_str!("testdata/decision_names_cut.json");

    #[test]
    fn an_sni_mismatch_line_is_explained_with_the_command_to_ask_now() {
        let explained = explain_line(SNI_MISMATCH).expect("a decision line");
        assert_eq!(
            (explained.verdict.as_str(), explained.reason.as_str()),
            ("deny", "sni_mismatch")
        );
        assert_eq!(explained.pod.as_deref(), Some("shop/app-1"));
        assert!(
            explained.says.contains("SNI evil.example.test"),
            "{}",
            explained.says
        );
        assert!(
            explained
                .notes
                .iter()
                .any(|n| n.contains("SNI evil.example.test is a name this pod resolved")),
            "resolved, yet no rule allows it: {:?}",
            explained.notes
        );
        assert_eq!(
            explained.explain_command.as_deref(),
            Some(
                "egressgate explain --pod shop/app-1 --to 198.19.0.10:443 --sni evil.example.test"
            )
        );
    }

    #[test]
    fn a_cut_name_list_is_read_with_the_requested_name_first() {
        let explained = explain_line(NAMES_CUT).expect("a decision line");
        assert_eq!(explained.reason, "allowed");
        assert!(
            explained.notes.iter().any(|n| n.contains("held 300 names")),
            "{:?}",
            explained.notes
        );
        assert!(
            explained
                .notes
                .iter()
                .any(|n| n.contains("Host n250.example.test is a name this pod resolved")),
            "{:?}",
            explained.notes
        );
    }

    #[test]
    fn other_lines_and_garbage_are_refused() {
        assert!(explain_line(
            "{\"event\":\"dns\",\"verdict\":\"x\",\"reason\":\"y\",\"destination\":\"1.2.3.4:1\"}"
        )
        .is_err());
        assert!(explain_line("not json").is_err());
        let mixed = format!(
            "{{\"event\":\"listening\"}}\n\n{}\n{}",
            SNI_MISMATCH.trim(),
            NAMES_CUT.trim()
        );
        assert_eq!(explain_lines(&mixed).expect("two decisions").len(), 2);
        assert!(explain_lines("{\"event\":\"listening\"}\n").is_err());
    }
}
