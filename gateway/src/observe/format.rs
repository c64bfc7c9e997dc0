//! One readable line per decision or DNS answer, for people; `-o json` prints the lines as the
//! gateway wrote them instead.

use std::fmt::Write as _;

use serde_json::Value;

/// ANSI colours for a terminal; none otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Terminal,
    Plain,
}

impl Colour {
    fn paint(self, code: &str, text: &str) -> String {
        match self {
            Colour::Terminal => format!("\x1b[{code}m{text}\x1b[0m"),
            Colour::Plain => text.to_owned(),
        }
    }
}

/// The readable form of one JSON line; `None` for a blank keep-alive line.
pub fn readable(line: &str, colour: Colour) -> Option<String> {
    if line.trim().is_empty() {
        return None;
    }
    let Ok(value) = serde_json::from_str::<Value>(line) else {
        return Some(line.to_owned());
    };
    let text = |field: &str| value.get(field).and_then(Value::as_str);
    let time = text("time")
        .and_then(|t| t.get(11..23))
        .unwrap_or("--:--:--.---");
    Some(match text("event") {
        Some("decision") => decision(&value, time, colour),
        Some("dns") => dns(&value, time, colour),
        Some("dropped") => {
            let lines = value.get("lines").and_then(Value::as_u64).unwrap_or(0);
            colour.paint(
                "1",
                &format!("{time} --- {lines} line(s) dropped: this observer read too slowly ---"),
            )
        }
        _ => line.to_owned(),
    })
}

fn decision(value: &Value, time: &str, colour: Colour) -> String {
    let text = |field: &str| value.get(field).and_then(Value::as_str);
    let verdict = text("verdict").unwrap_or("?");
    let code = match verdict {
        "allow" => "32",
        "deny" => "31",
        _ => "33",
    };
    let verdict = colour.paint(code, &format!("{:<5}", verdict.to_uppercase()));
    let pod = value.get("pod").and_then(|pod| {
        Some(format!(
            "{}/{}",
            pod.get("namespace")?.as_str()?,
            pod.get("name")?.as_str()?
        ))
    });
    let source = text("source").unwrap_or("?");
    let pod = pod.unwrap_or_else(|| format!("{source} (unknown)"));
    let destination = text("destination").unwrap_or("?");
    // The name the pod asked for, else the first it resolved to the address.
    let first_name = text("sni").or(text("host")).or_else(|| {
        value
            .get("names")
            .and_then(Value::as_array)
            .and_then(|names| names.first())
            .and_then(Value::as_str)
    });
    let to = match (first_name, destination.rsplit_once(':')) {
        (Some(name), Some((ip, port))) => format!("{name}:{port} ({ip})"),
        _ => destination.to_owned(),
    };
    let mut out = format!("{time} {verdict} {pod} → {to}");
    if let Some(protocol) = text("protocol") {
        let _ = write!(out, " {protocol}");
    }
    for (field, label) in [
        ("sni", "sni"),
        ("host", "host"),
        ("database", "db"),
        ("user", "user"),
    ] {
        if let Some(value) = text(field) {
            let _ = write!(out, " {label}={value}");
        }
    }
    let reason = text("reason").unwrap_or("?");
    let _ = write!(out, "  {reason}");
    if let Some(detail) = text("detail") {
        let _ = write!(out, " ({detail})");
    }
    if let (Some(policy), Some(rule)) = (text("policy"), value.get("rule")) {
        let _ = write!(out, " by {policy} rule {rule}");
    }
    out
}

fn dns(value: &Value, time: &str, colour: Colour) -> String {
    let text = |field: &str| value.get(field).and_then(Value::as_str);
    let list = |field: &str| -> Vec<&str> {
        value
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    };
    let label = colour.paint("36", "DNS  ");
    let mut out = format!(
        "{time} {label} {} {} {}",
        text("pod").unwrap_or("?"),
        text("name").unwrap_or("?"),
        text("type").unwrap_or("?"),
    );
    let addresses = list("addresses");
    let cnames = list("cnames");
    if !cnames.is_empty() {
        let _ = write!(out, " via {}", cnames.join(", "));
    }
    if !addresses.is_empty() {
        let _ = write!(out, " → {}", addresses.join(", "));
    }
    if let Some(ttl) = value.get("ttl").and_then(Value::as_u64) {
        let _ = write!(out, " (ttl {ttl})");
    }
    let _ = write!(out, "  {}", text("rcode").unwrap_or("?"));
    out
}
