//! Why each reason code comes about, in words, with the facts of one decision: shared by the
//! trace (its last step) and the explanation of a decision line. The codes are those of
//! `decision::Reason`; a code this build does not know still gets a sentence.

use std::net::SocketAddr;

/// What is known of one decision.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// `namespace/name`.
    pub pod: Option<String>,
    pub destination: Option<SocketAddr>,
    /// Names the pod resolved to the destination (the requested one first, if resolved).
    pub names: Vec<String>,
    /// The SNI or Host the first message asked for.
    pub requested: Option<String>,
    /// The first message in words.
    pub first_message: Option<String>,
    pub policy: Option<String>,
    pub rule: Option<usize>,
}

impl From<SocketAddr> for Facts {
    fn from(destination: SocketAddr) -> Self {
        Facts {
            destination: Some(destination),
            ..Facts::default()
        }
    }
}

/// One or two sentences: why `reason` and what `verdict` did with it.
pub fn says(reason: &str, verdict: &str, facts: &Facts) -> String {
    let pod = facts.pod.as_deref().unwrap_or("the pod");
    let dst = facts
        .destination
        .map_or("the destination".to_owned(), |d| d.to_string());
    let ip = facts
        .destination
        .map_or("the address".to_owned(), |d| d.ip().to_string());
    let port = facts
        .destination
        .map_or("the port".to_owned(), |d| d.port().to_string());
    let names = if facts.names.is_empty() {
        "no name".to_owned()
    } else {
        facts.names.join(", ")
    };
    let requested = facts.requested.as_deref().unwrap_or("(none)");
    let why = match reason {
        "allowed" => format!(
            "{} rule {} allows {pod} to reach {dst}{}.",
            facts.policy.as_deref().unwrap_or("a policy's"),
            facts.rule.map_or("?".to_owned(), |r| r.to_string()),
            match &facts.requested {
                Some(name) => format!(" as {name}"),
                None => String::new(),
            }
        ),
        "unselected" => format!(
            "No policy selects {pod}: the unselectedPods setting decides, and nothing is read."
        ),
        "unknown_source" => "No known pod uses the source address: the unknownSources setting \
                             decides, and nothing is read."
            .to_owned(),
        "no_dns_record" => format!(
            "{pod} has no live name for {ip} (it did not resolve one through the gateway's DNS, \
             or the record expired), and no cidr rule covers {ip}. Resolve the name in the pod \
             first, or add a cidr rule."
        ),
        "not_allowed" => format!(
            "{pod} resolved {names} to {ip}, but no rule of the policies that count allows these \
             names (or {ip}) on port {port}."
        ),
        "sni_missing" => "The ClientHello has no SNI, and peek.requireSni is on: a dnsName rule \
                          needs the name the client asks for."
            .to_owned(),
        "sni_mismatch" => format!(
            "A tls rule matches {ip}:{port} for the names {pod} resolved ({names}), but the SNI \
             {requested} is not one of them that a rule allows. A pod may only ask for a name it \
             resolved to this address."
        ),
        "host_missing" => "The HTTP/1.0 request has no Host header.".to_owned(),
        "host_mismatch" => format!(
            "An http rule matches {ip}:{port} for the names {pod} resolved ({names}), but the \
             Host {requested} is not one of them that a rule allows."
        ),
        "protocol_mismatch" => format!(
            "Rules match {ip}:{port}, but none for the protocol the client spoke{}.",
            match &facts.first_message {
                Some(first) => format!(" ({first})"),
                None => String::new(),
            }
        ),
        "postgresql_denied" => format!(
            "A postgresql rule matches {dst}, but it does not list this database and user{}.",
            match &facts.first_message {
                Some(first) => format!(" ({first})"),
                None => String::new(),
            }
        ),
        "postgresql_encrypted" => "The PostgreSQL session turned encrypted, so its database and \
             user cannot be seen, and the rule lists databases or users without allowEncrypted."
            .to_owned(),
        "peek_timeout" => "The client did not send its whole first message within \
             peek.timeoutMs (a server-speaks-first protocol, or a slow client)."
            .to_owned(),
        "peek_too_large" => "The first message grew past peek.maxBytes.".to_owned(),
        "malformed" => {
            "The first message is not valid for its protocol (detail says how).".to_owned()
        }
        "http_smuggling" => "The HTTP/1 request's framing is ambiguous (request smuggling; \
             detail says how)."
            .to_owned(),
        "upstream_unreachable" => format!(
            "{dst} did not answer a message the gateway had to see answered before deciding."
        ),
        "client_closed" => "The client closed before the gateway could decide.".to_owned(),
        "connection_limit" => "connections.max connections were already open.".to_owned(),
        "peek_limit" => "Too many connections (from this pod, or in all) were already waiting \
             for their first message (peek.maxPending, peek.maxPendingPerPod)."
            .to_owned(),
        other => format!("Reason {other} (not known to this egressgate build)."),
    };
    let outcome = match verdict {
        "audit" => {
            " Only audit-mode policies select the pod: the connection is let through and \
             logged as audit."
        }
        "deny" if reason != "allowed" => " It is denied (reset).",
        "allow" if reason != "allowed" => " It is allowed.",
        _ => "",
    };
    format!("{why}{outcome}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_carry_the_facts() {
        let facts = Facts {
            pod: Some("shop/app-1".into()),
            destination: Some("198.19.0.10:443".parse().expect("addr")),
            names: vec!["api.example.test".into()],
            requested: Some("evil.example.test".into()),
            ..Facts::default()
        };
        let text = says("sni_mismatch", "deny", &facts);
        assert!(text.contains("SNI evil.example.test"), "{text}");
        assert!(text.contains("(api.example.test)"), "{text}");
        assert!(text.ends_with("It is denied (reset)."), "{text}");
        let audit = says("not_allowed", "audit", &facts);
        assert!(audit.contains("logged as audit"), "{audit}");
        let unknown = says("a_future_code", "deny", &Facts::default());
        assert!(unknown.contains("a_future_code"), "{unknown}");
        assert!(says("unselected", "allow", &facts).ends_with("It is allowed."));
    }
}
