//! Unit tests for `http`: one or more heads per `Invalid` variant, and host normalisation.

use super::*;

fn invalid(head: &str) -> Invalid {
    match peek_request_head(head.as_bytes()) {
        Peek::Invalid(invalid) => invalid,
        other => panic!("expected Invalid for {head:?}, got {other:?}"),
    }
}

fn complete(head: &str) -> RequestHead {
    match peek_request_head(head.as_bytes()) {
        Peek::Complete(parsed) => parsed,
        other => panic!("expected Complete for {head:?}, got {other:?}"),
    }
}

/// The host as text (as the decision line writes it) and the port.
fn host(head: &str) -> (Option<String>, Option<u16>) {
    let parsed = complete(head);
    (parsed.host.map(|host| host.to_string()), parsed.host_port)
}

#[test]
fn incomplete_until_the_blank_line() {
    for head in [
        "",
        "GET",
        "GET / HTTP/1.1\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\n",
        "GET / HTTP/1.1\r\n\r",
    ] {
        assert_eq!(
            peek_request_head(head.as_bytes()),
            Peek::Incomplete,
            "{head:?}"
        );
    }
}

#[test]
fn host_is_lowercased_without_port_or_trailing_dot() {
    let some = |h: &str, p| (Some(h.to_owned()), p);
    assert_eq!(
        host("GET / HTTP/1.1\r\nhOsT: API.Example.TEST.:8443\r\n\r\n"),
        some("api.example.test", Some(8443))
    );
    assert_eq!(
        host("GET / HTTP/1.1\r\nHost: [2001:DB8::1]:80\r\n\r\n"),
        some("2001:db8::1", Some(80))
    );
    assert_eq!(
        host("GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n"),
        some("::1", None)
    );
    assert_eq!(
        host("GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n"),
        some("10.0.0.1", Some(80))
    );
    assert_eq!(
        host("GET / HTTP/1.1\r\nHost:   a.example \t\r\n\r\n"),
        some("a.example", None)
    );
    assert_eq!(
        host("OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        some("a.example", None)
    );
    assert_eq!(host("GET / HTTP/1.1\r\nHost:\r\n\r\n"), (None, None));
    assert_eq!(host("GET / HTTP/1.0\r\n\r\n"), (None, None));
    let head = complete("GET / HTTP/1.0\r\nX: y\r\n\r\nbody");
    assert_eq!((head.version_minor, head.consumed), (0, 24));
}

#[test]
fn absolute_form_authority_is_the_host() {
    let some = |h: &str, p| (Some(h.to_owned()), p);
    assert_eq!(
        host("GET http://A.example:8080/x?y HTTP/1.1\r\n\r\n"),
        some("a.example", Some(8080))
    );
    assert_eq!(
        host("GET HTTPS://a.example HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        some("a.example", None)
    );
    assert_eq!(
        host("GET http://a.example/ HTTP/1.1\r\nHost: A.EXAMPLE.\r\n\r\n"),
        some("a.example", None)
    );
}

#[test]
fn absolute_form_disagreeing_with_host_rejected() {
    for head in [
        "GET http://api.example.test/ HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
        "GET http://a.example:80/ HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
        "GET http://a.example/ HTTP/1.1\r\nHost:\r\n\r\n",
        "GET https://a.example/ HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    ] {
        assert_eq!(invalid(head), Invalid::HttpHostConflict, "{head:?}");
    }
}

#[test]
fn two_host_headers_rejected() {
    let head = "GET / HTTP/1.1\r\nHost: a.example\r\nX: y\r\nHOST: b.example\r\n\r\n";
    assert_eq!(invalid(head), Invalid::HttpDuplicateHost);
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n"),
        Invalid::HttpDuplicateHost
    );
}

#[test]
fn header_line_faults_rejected() {
    let obs_fold = "GET / HTTP/1.1\r\nHost: a.example\r\nX-Long: a\r\n  b\r\n\r\n";
    assert_eq!(invalid(obs_fold), Invalid::HttpObsFold { line: 4 });
    assert_eq!(
        invalid("GET / HTTP/1.1\r\n Host: a\r\n"),
        Invalid::HttpObsFold { line: 2 }
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nHost a\r\n"),
        Invalid::HttpHeaderNoColon { line: 2 }
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nHost : a\r\n"),
        Invalid::HttpSpaceBeforeColon { line: 2 }
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nHo(st: a\r\n"),
        Invalid::HttpBadHeaderName { line: 2 }
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\r\n: a\r\n"),
        Invalid::HttpBadHeaderName { line: 2 }
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nX: a\0b\r\n"),
        Invalid::HttpBadHeaderValue { line: 2 }
    );
    // Only SP and HTAB are OWS: a form feed at either end is a control byte, not trimmed
    // (the server would see a host the gateway did not check).
    for head in [
        "GET / HTTP/1.1\r\nHost: api.example.test\x0c\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: \x0capi.example.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost:\x0c api.example.test \x0c\r\n\r\n",
    ] {
        assert_eq!(
            invalid(head),
            Invalid::HttpBadHeaderValue { line: 2 },
            "{head:?}"
        );
    }
    assert_eq!(
        host("GET / HTTP/1.1\r\nHost: \t api.example.test \t \r\n\r\n").0,
        Some("api.example.test".to_owned())
    );
    assert_eq!(host("GET / HTTP/1.1\r\nHost:\r\n\r\n").0, None);
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nX: a\rb\r\n"),
        Invalid::HttpLineEnding { line: 2 }
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\nHost: a\n\n"),
        Invalid::HttpLineEnding { line: 1 }
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nHost: a\n"),
        Invalid::HttpLineEnding { line: 2 }
    );
}

#[test]
fn request_line_faults_rejected() {
    let bad = |reason| Invalid::HttpBadRequestLine { reason };
    assert_eq!(invalid("G(T / HTTP/1.1\r\n"), Invalid::HttpBadMethod);
    assert_eq!(invalid(" GET / HTTP/1.1\r\n"), Invalid::HttpBadMethod);
    assert_eq!(invalid("\r\n"), Invalid::HttpBadMethod);
    assert_eq!(invalid("GET /\r\n"), bad("fewer than three parts"));
    assert_eq!(
        invalid("GET  / HTTP/1.1\r\n"),
        bad("request-target empty or with a byte outside 0x21..=0x7e")
    );
    assert_eq!(
        invalid("GET / HTTP/1.1 \r\n"),
        bad("malformed HTTP-version")
    );
    assert_eq!(invalid("GET / http/1.1\r\n"), bad("malformed HTTP-version"));
    assert_eq!(
        invalid("GET / HTTP/1.2\r\n"),
        Invalid::HttpUnsupportedVersion { major: 1, minor: 2 }
    );
    assert_eq!(
        invalid("GET / HTTP/2.0\r\n"),
        Invalid::HttpUnsupportedVersion { major: 2, minor: 0 }
    );
    assert_eq!(invalid("PRI * HTTP/2.0\r\n"), Invalid::Http2Preface);
    assert_eq!(
        invalid("CONNECT a.example:443 HTTP/1.1\r\n"),
        Invalid::HttpConnect
    );
    assert_eq!(
        invalid("GET * HTTP/1.1\r\n"),
        bad("asterisk-form with a method other than OPTIONS")
    );
    assert_eq!(
        invalid("GET ftp://a/ HTTP/1.1\r\n"),
        bad("absolute-form scheme is not http or https")
    );
    assert_eq!(
        invalid("GET a.example:80 HTTP/1.1\r\n"),
        bad("request-target is not origin-, absolute- or asterisk-form")
    );
}

#[test]
fn bad_hosts_rejected() {
    let bad = |reason| Invalid::HttpBadHost { reason };
    let with_host = |value: &str| invalid(&format!("GET / HTTP/1.1\r\nHost: {value}\r\n\r\n"));
    assert_eq!(with_host("a.example:65536"), bad("invalid port"));
    assert_eq!(with_host("a.example:"), bad("invalid port"));
    assert_eq!(with_host("a.example:+80"), bad("invalid port"));
    assert_eq!(with_host("user@a.example"), bad("userinfo in authority"));
    assert_eq!(with_host("[::1"), bad("unterminated IPv6 literal"));
    assert_eq!(with_host("[v1.x]"), bad("invalid IPv6 literal"));
    assert_eq!(with_host("[::1]x"), bad("bytes after IPv6 literal"));
    assert_eq!(
        with_host("a%2eexample"),
        bad("byte outside [A-Za-z0-9_-] in a label")
    );
    assert_eq!(with_host("127.1"), bad("all-numeric last label"));
    assert_eq!(
        invalid("GET http:///x HTTP/1.1\r\n"),
        bad("empty authority in absolute-form")
    );
    assert_eq!(
        invalid("GET / HTTP/1.1\r\nX: y\r\n\r\n"),
        Invalid::HttpMissingHost
    );
}

#[test]
fn header_count_is_capped() {
    let head = |n: usize| {
        let headers: String = (0..n).map(|i| format!("X-{i}: v\r\n")).collect();
        format!("GET / HTTP/1.1\r\nHost: a.example\r\n{headers}\r\n")
    };
    assert!(matches!(
        peek_request_head(head(MAX_HEADERS - 1).as_bytes()),
        Peek::Complete(_)
    ));
    let max = MAX_HEADERS;
    assert_eq!(
        invalid(&head(MAX_HEADERS)),
        Invalid::HttpTooManyHeaders { max }
    );
}
