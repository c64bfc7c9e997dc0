//! The admin Unix socket, `state.dir/admin.sock`: the operator API (`egressgate explain`, ...),
//! reached on the node or through `kubectl exec`, never over the TCP admin port Prometheus
//! scrapes: its answers name pods and destinations.
//!
//! HTTP/1 (hyper), one request per connection, JSON in and out. A [`Router`] maps (method, path)
//! to a [`Handler`]; an unknown path is `404`, a known path with another method `405` (with
//! `Allow`), a request body over [`MAX_BODY`] `413`, every error a JSON `{"error": ...}`. Only
//! root or the gateway's own user may connect (the file is `0600` and the peer's uid is checked);
//! at most [`MAX_CONNECTIONS`] at once; a client slow to send its request is dropped.
//!
//! The file is bound under a temporary name and renamed over any predecessor's, so during a
//! hand-over the socket always answers, and from the successor on once it serves; each process
//! removes it at stop only while it is still its own.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// The socket's file name in `state.dir`.
pub const SOCKET_NAME: &str = "admin.sock";

/// Request bodies are small JSON documents (an explain query is a few hundred bytes); the cap
/// keeps a client from making the gateway buffer much.
pub const MAX_BODY: usize = 64 * 1024;

/// Most bytes of a refused body read (and dropped) before the `413`.
const MAX_DRAINED: usize = 1 << 20;

/// Connections served at once; more wait in the listen backlog. A long-lived stream holds one.
pub const MAX_CONNECTIONS: usize = 64;

/// A client must send its request head, and then its body, within this: idle or slow
/// connections must not hold one of the [`MAX_CONNECTIONS`].
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of every answer: a whole JSON document, or a stream a handler builds.
pub type Body = BoxBody<Bytes, io::Error>;

/// A request as a handler sees it: the body already read whole (at most [`MAX_BODY`]).
#[derive(Debug)]
pub struct AdminRequest {
    pub method: Method,
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    pub body: Bytes,
}

/// What serves one (method, path).
pub type Handler =
    Arc<dyn Fn(AdminRequest) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync>;

/// (method, path) → handler. Paths are exact (no patterns): each endpoint is one line.
#[derive(Clone, Default)]
pub struct Router {
    routes: BTreeMap<&'static str, Vec<(Method, Handler)>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routes: Vec<String> = self
            .routes
            .iter()
            .flat_map(|(path, handlers)| handlers.iter().map(move |(m, _)| format!("{m} {path}")))
            .collect();
        f.debug_struct("Router").field("routes", &routes).finish()
    }
}

impl Router {
    pub fn new() -> Self {
        Router::default()
    }

    /// Serves `method path` with `handler`, an async function of the request.
    pub fn route<F, Fut>(mut self, method: Method, path: &'static str, handler: F) -> Self
    where
        F: Fn(AdminRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |request| Box::pin(handler(request)));
        self.routes.entry(path).or_default().push((method, handler));
        self
    }

    /// The handler for `method path`, or the error answer (404, or 405 naming the methods).
    fn find(&self, method: &Method, path: &str) -> Result<&Handler, Box<Response<Body>>> {
        let Some(handlers) = self.routes.get(path) else {
            return Err(Box::new(error(
                StatusCode::NOT_FOUND,
                format!("no endpoint {path}"),
            )));
        };
        if let Some((_, handler)) = handlers.iter().find(|(m, _)| m == method) {
            return Ok(handler);
        }
        let allowed: Vec<&str> = handlers.iter().map(|(m, _)| m.as_str()).collect();
        let allowed = allowed.join(", ");
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes {allowed}, not {method}"),
        );
        if let Ok(value) = HeaderValue::from_str(&allowed) {
            response.headers_mut().insert(ALLOW, value);
        }
        Err(Box::new(response))
    }
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(status, "application/json", Bytes::from(body))
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

/// The JSON error every refusal uses: `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    #[derive(Serialize)]
    struct ErrorBody {
        error: String,
    }
    let body = ErrorBody {
        error: message.into(),
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    respond(status, "application/json", Bytes::from(bytes))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let body = Full::new(body)
        .map_err(|never: Infallible| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The socket's path in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// A bound admin socket, not yet serving.
#[derive(Debug)]
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

impl AdminSocket {
    /// Listens on `state_dir/admin.sock`, mode 0600, replacing a predecessor's file (bound under
    /// a temporary name and renamed, so a client never finds no socket).
    pub fn bind(state_dir: &Path) -> io::Result<AdminSocket> {
        std::fs::create_dir_all(state_dir)?;
        let path = socket_path(state_dir);
        let tmp = state_dir.join(format!("{SOCKET_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, &path)?;
        let inode = std::fs::metadata(&path)?.ino();
        Ok(AdminSocket {
            listener,
            path,
            inode,
        })
    }

    /// Serves `router` until `shutdown`, then removes the file if it is still this process's
    /// (a successor renames its own over it). Connections already accepted finish on their own.
    pub async fn serve(self, router: Router, shutdown: impl Future<Output = ()>) {
        let own_uid = rustix::process::geteuid().as_raw();
        let router = Arc::new(router);
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = accept(&self.listener, &permits) => accepted,
            };
            let Some((stream, permit)) = accepted else {
                continue;
            };
            let router = Arc::clone(&router);
            tokio::spawn(async move {
                serve_connection(stream, router, own_uid).await;
                drop(permit);
            });
        }
        self.remove();
    }

    fn remove(&self) {
        let ours = std::fs::metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The next connection and its permit (waiting for one while [`MAX_CONNECTIONS`] are served).
async fn accept(
    listener: &UnixListener,
    permits: &Arc<Semaphore>,
) -> Option<(UnixStream, tokio::sync::OwnedSemaphorePermit)> {
    let permit = Arc::clone(permits).acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => Some((stream, permit)),
        Err(e) => {
            tracing::warn!(error = %e, "admin socket: accept failed");
            // EMFILE and friends would fail again at once: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// Root, or the user the gateway runs as: whoever else reached the socket file (a changed mode,
/// a shared mount) is refused.
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

async fn serve_connection(stream: UnixStream, router: Arc<Router>, own_uid: u32) {
    let peer_uid = stream.peer_cred().map(|cred| cred.uid()).ok();
    let allowed = peer_uid.is_some_and(|uid| peer_allowed(uid, own_uid));
    let service = service_fn(move |request: Request<Incoming>| {
        let router = Arc::clone(&router);
        async move {
            if !allowed {
                let who = peer_uid.map_or("an unknown user".to_owned(), |uid| format!("uid {uid}"));
                return Ok::<_, Infallible>(error(
                    StatusCode::FORBIDDEN,
                    format!("{who} may not use the admin socket (root or uid {own_uid} only)"),
                ));
            }
            Ok(dispatch(&router, request).await)
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "admin socket connection failed");
    }
}

async fn dispatch(router: &Router, request: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = request.into_parts();
    let handler = match router.find(&parts.method, parts.uri.path()) {
        Ok(handler) => Arc::clone(handler),
        Err(refusal) => return *refusal,
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return refuse_too_large(body).await;
    }
    let read = tokio::time::timeout(READ_TIMEOUT, read_capped(&mut body)).await;
    let body = match read {
        Ok(Ok(Some(whole))) => whole,
        Ok(Ok(None)) => return refuse_too_large(body).await,
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {READ_TIMEOUT:?}"),
            )
        }
    };
    handler(AdminRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        body,
    })
    .await
}

/// The whole body, or `None` past [`MAX_BODY`] (the rest left unread).
async fn read_capped(body: &mut Incoming) -> Result<Option<Bytes>, hyper::Error> {
    let mut whole = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            if whole.len() + data.len() > MAX_BODY {
                return Ok(None);
            }
            whole.extend_from_slice(data);
        }
    }
    Ok(Some(whole.into()))
}

/// `413`, once the rest of the body is read and dropped (up to [`MAX_DRAINED`] bytes, within
/// [`READ_TIMEOUT`]): a client still sending when the socket closed would get a broken pipe
/// instead of the answer.
async fn refuse_too_large(mut body: Incoming) -> Response<Body> {
    let drain = async {
        let mut drained = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            drained += frame.data_ref().map_or(0, Bytes::len);
            if drained > MAX_DRAINED {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, drain).await;
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request bodies are limited to {MAX_BODY} bytes"),
    )
}

/// The client side, for the CLI: one request over the socket, the answer's status and body.
pub mod client {
    use super::*;

    /// Why a request over the admin socket failed.
    #[derive(Debug, thiserror::Error)]
    pub enum ClientError {
        #[error("cannot connect to {path}: {source} (is the gateway running with this state directory? root or the gateway's user only)")]
        Connect { path: PathBuf, source: io::Error },
        #[error("admin socket: {0}")]
        Http(#[from] hyper::Error),
        #[error("admin socket: {0}")]
        Request(#[from] hyper::http::Error),
        #[error("admin socket: no answer within {0:?}")]
        Timeout(Duration),
    }

    /// Sends `method path` with `body` (JSON) and returns the response, its body still to read
    /// (a stream for a streaming endpoint).
    pub async fn send(
        socket: &Path,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "admin socket client connection");
            }
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "egressgate")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        Ok(sender.send_request(request).await?)
    }

    /// [`send`] and read the whole answer, within `timeout`.
    pub async fn call(
        socket: &Path,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let exchange = async {
            let response = send(socket, method, path, body).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    use super::*;

    fn echo_router() -> Router {
        Router::new()
            .route(
                Method::POST,
                "/v1/echo",
                |request: AdminRequest| async move {
                    #[derive(Serialize)]
                    struct Echo {
                        bytes: usize,
                        query: Option<String>,
                    }
                    json(
                        StatusCode::OK,
                        &Echo {
                            bytes: request.body.len(),
                            query: request.query,
                        },
                    )
                },
            )
            .route(Method::GET, "/v1/echo", |_| async {
                json(StatusCode::OK, &"get")
            })
    }

    async fn raw(socket: &Path, request: &[u8]) -> String {
        let mut stream = UnixStream::connect(socket).await.expect("connect");
        stream.write_all(request).await.expect("send");
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("answer in time")
            .expect("read");
        response
    }

    #[tokio::test]
    async fn routes_refusals_and_the_file_lifecycle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = AdminSocket::bind(dir.path()).expect("bind");
        let path = socket_path(dir.path());
        let mode = std::fs::metadata(&path).expect("socket file").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(socket.serve(echo_router(), async {
            let _ = stopped.await;
        }));
        let timeout = Duration::from_secs(5);

        let (status, body) =
            client::call(&path, Method::POST, "/v1/echo?x=1", "{}".into(), timeout)
                .await
                .expect("answer");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"{\"bytes\":2,\"query\":\"x=1\"}\n");
        let (status, _) = client::call(&path, Method::GET, "/v1/echo", Bytes::new(), timeout)
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::OK);

        let (status, body) = client::call(&path, Method::GET, "/v1/nope", Bytes::new(), timeout)
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(&body[..], b"{\"error\":\"no endpoint /v1/nope\"}");

        let wrong = raw(&path, b"DELETE /v1/echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(wrong.starts_with("HTTP/1.1 405 "), "{wrong}");
        assert!(wrong.contains("allow: POST, GET\r\n"), "{wrong}");
        assert!(wrong.contains("{\"error\":"), "{wrong}");

        let big = vec![b'x'; MAX_BODY + 1];
        let (status, _) = client::call(&path, Method::POST, "/v1/echo", big.into(), timeout)
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        // Chunked, so only the running count can tell.
        let mut chunked =
            b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..5 {
            chunked.extend_from_slice(format!("{:x}\r\n", 16 * 1024).as_bytes());
            chunked.extend(std::iter::repeat_n(b'y', 16 * 1024));
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let answer = raw(&path, &chunked).await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        // A client that sends its whole (refused) body before reading, more than the socket
        // buffers hold: the refusal waits for it, so the client reads a 413, not a broken pipe.
        let len = 900 * 1024;
        let mut whole =
            format!("POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n")
                .into_bytes();
        whole.resize(whole.len() + len, b'z');
        let answer = raw(&path, &whole).await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        let exact = vec![b'x'; MAX_BODY];
        let (status, _) = client::call(&path, Method::POST, "/v1/echo", exact.into(), timeout)
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::OK, "the cap itself is allowed");

        stop.send(()).expect("still serving");
        server.await.expect("serve returns");
        assert!(!path.exists(), "removed on shutdown");
    }

    #[tokio::test]
    async fn a_successor_replaces_the_file_and_the_old_process_leaves_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = AdminSocket::bind(dir.path()).expect("bind old");
        let (stop_old, old_stopped) = oneshot::channel::<()>();
        let old = tokio::spawn(old.serve(echo_router(), async {
            let _ = old_stopped.await;
        }));
        let new = AdminSocket::bind(dir.path()).expect("bind new");
        let new_inode = std::fs::metadata(socket_path(dir.path()))
            .expect("file")
            .ino();
        stop_old.send(()).expect("old serving");
        old.await.expect("old stops");
        let path = socket_path(dir.path());
        assert_eq!(
            std::fs::metadata(&path).expect("still there").ino(),
            new_inode,
            "the old process removed only its own file"
        );
        let (stop_new, new_stopped) = oneshot::channel::<()>();
        let new = tokio::spawn(new.serve(echo_router(), async {
            let _ = new_stopped.await;
        }));
        let (status, _) = client::call(
            &path,
            Method::GET,
            "/v1/echo",
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await
        .expect("the successor answers");
        assert_eq!(status, StatusCode::OK);
        stop_new.send(()).expect("new serving");
        new.await.expect("new stops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_nothing_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = AdminSocket::bind(dir.path()).expect("bind");
        let path = socket_path(dir.path());
        tokio::spawn(socket.serve(echo_router(), std::future::pending()));
        let mut idle = UnixStream::connect(&path).await.expect("connect");
        let mut buf = Vec::new();
        let read = tokio::time::timeout(READ_TIMEOUT * 2, idle.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "closed by the server within the read timeout");
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_free_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = AdminSocket::bind(dir.path()).expect("bind");
        let path = socket_path(dir.path());
        tokio::spawn(socket.serve(echo_router(), std::future::pending()));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(UnixStream::connect(&path).await.expect("connect"));
        }
        // Let the server accept them all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waiting = tokio::spawn({
            let path = path.clone();
            async move { raw(&path, b"GET /v1/echo HTTP/1.1\r\nHost: x\r\n\r\n").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "served past the cap");
        idle.pop();
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("served once a connection closed")
            .expect("no panic");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }

    #[test]
    fn only_root_and_the_gateways_user_are_allowed() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(65534, 0));
    }
}
