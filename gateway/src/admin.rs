//! The admin endpoint: `GET /metrics` (Prometheus text format), `GET /healthz` (the process is
//! serving) and `GET /readyz` (listeners bound and rules installed). HTTP/1 only; it is meant for
//! loopback or a node-local scraper.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// A client that has not sent its request head by then is dropped: idle or slow connections must
/// not pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoint on `listener` until `shutdown` completes. Connections already
/// accepted finish on their own.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    // A connection reset before accept is the peer's business; anything else
                    // (EMFILE and friends) would fail again at once: back off instead of spinning.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let ready = Arc::clone(&ready);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request, &registry, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "admin connection failed");
            }
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    registry: &Registry,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    // hyper leaves the body out of HEAD responses itself.
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => metrics(registry),
        "/readyz" if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::OK, "ok\n"),
    }
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut body) {
        tracing::warn!(error = %e, "cannot encode metrics");
        return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n");
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    if let Ok(value) = HeaderValue::from_str(encoder.format_type()) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use prometheus::IntCounter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    use super::*;

    /// Sends one HTTP/1.0 request (the server closes after answering) and returns the response.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(format!("{method} {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
            .await
            .expect("send request");
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("response in time")
            .expect("read response");
        response
    }

    fn status_line(response: &str) -> &str {
        response.lines().next().unwrap_or_default()
    }

    #[tokio::test]
    async fn routes_answer_and_readiness_flips() {
        let registry = Registry::new();
        let counter =
            IntCounter::new("admin_test_hits_total", "Hits in the admin test.").expect("counter");
        registry
            .register(Box::new(counter.clone()))
            .expect("register");
        counter.inc_by(3);
        let ready = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, registry, Arc::clone(&ready), async {
            let _ = stopped.await;
        }));

        let metrics = request(addr, "GET", "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.0 200 OK\r\n"), "{metrics}");
        assert!(
            metrics.contains("content-type: text/plain; version=0.0.4\r\n"),
            "{metrics}"
        );
        assert!(metrics.contains("\nadmin_test_hits_total 3\n"), "{metrics}");

        let healthz = request(addr, "GET", "/healthz").await;
        assert_eq!(status_line(&healthz), "HTTP/1.0 200 OK");
        assert!(healthz.ends_with("\r\n\r\nok\n"), "{healthz}");

        let not_ready = request(addr, "GET", "/readyz").await;
        assert_eq!(status_line(&not_ready), "HTTP/1.0 503 Service Unavailable");
        assert!(not_ready.ends_with("\r\n\r\nnot ready\n"), "{not_ready}");
        ready.store(true, Ordering::Release);
        let now_ready = request(addr, "GET", "/readyz").await;
        assert_eq!(status_line(&now_ready), "HTTP/1.0 200 OK");
        assert!(now_ready.ends_with("\r\n\r\nready\n"), "{now_ready}");

        let head = request(addr, "HEAD", "/healthz").await;
        assert_eq!(status_line(&head), "HTTP/1.0 200 OK");
        assert!(head.ends_with("\r\n\r\n"), "no body for HEAD: {head}");

        let missing = request(addr, "GET", "/nope").await;
        assert_eq!(status_line(&missing), "HTTP/1.0 404 Not Found");
        let post = request(addr, "POST", "/metrics").await;
        assert_eq!(status_line(&post), "HTTP/1.0 405 Method Not Allowed");
        assert!(post.contains("allow: GET, HEAD\r\n"), "{post}");

        stop.send(()).expect("server still running");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after shutdown")
            .expect("serve did not panic");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }
}
