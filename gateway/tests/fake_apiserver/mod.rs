//! A small in-test Kubernetes API server that speaks the list/watch wire format to the real
//! `kube` client over real HTTP/1 (hyper) on 127.0.0.1.
//!
//! - `GET /api/v1/{pods,namespaces}` lists: a JSON `PodList`/`NamespaceList` with
//!   `metadata.resourceVersion`, in pages linked by `metadata.continue` when the test sets several.
//! - With `watch=true`, a chunked response of newline-delimited events that the test writes
//!   through a [`Watch`] handle: `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK`, an `ERROR` with a `410`
//!   `Status`, a clean end, or a drop in the middle of an event.
//! - A watch or list can be answered with an HTTP error status instead ([`FakeApiServer::reject_watch`],
//!   [`ListReply::Status`]), lists can be held until released, and the whole server can stop
//!   answering ([`FakeApiServer::set_down`]).
//!
//! Every request is recorded with its decoded query so tests can assert what the client sent.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::channel::mpsc;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinHandle};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;
type Chunk = Result<Frame<Bytes>, std::io::Error>;

/// What a watch body is fed: frames, and pauses that let hyper flush what it has so far.
#[derive(Debug)]
enum Feed {
    Chunk(Chunk),
    Flush,
}

/// The resources served, by their path segment under `/api/v1/`.
pub const PODS: &str = "pods";
pub const NAMESPACES: &str = "namespaces";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub resource: String,
    pub watch: bool,
    /// The raw query string, as sent.
    pub raw_query: String,
    /// Decoded `key=value` pairs, in order.
    pub query: Vec<(String, String)>,
    /// How it was answered: an HTTP status, or 0 while held or when the connection was closed
    /// without an answer.
    pub status: u16,
}

impl Recorded {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find_map(|(k, v)| (k == key).then_some(v.as_str()))
    }
}

/// What list requests for a resource get.
#[derive(Debug, Clone)]
pub enum ListReply {
    /// The items, in pages (one page unless the test splits them), all at `resource_version`.
    Pages {
        resource_version: String,
        pages: Vec<Vec<Value>>,
    },
    /// An HTTP error with a `Status` body.
    Status(u16),
}

impl ListReply {
    pub fn items(resource_version: &str, items: Vec<Value>) -> Self {
        ListReply::Pages {
            resource_version: resource_version.to_owned(),
            pages: vec![items],
        }
    }
}

/// A watch the client opened: the test writes its events.
#[derive(Debug)]
pub struct Watch {
    pub request: Recorded,
    tx: mpsc::UnboundedSender<Feed>,
}

impl Watch {
    fn line(&self, value: &Value) {
        let mut text = value.to_string();
        text.push('\n');
        self.tx
            .unbounded_send(Feed::Chunk(Ok(Frame::data(Bytes::from(text)))))
            .expect("the client still reads this watch");
    }

    pub fn event(&self, kind: &str, object: &Value) {
        self.line(&json!({"type": kind, "object": object}));
    }

    pub fn added(&self, object: &Value) {
        self.event("ADDED", object);
    }

    pub fn modified(&self, object: &Value) {
        self.event("MODIFIED", object);
    }

    pub fn deleted(&self, object: &Value) {
        self.event("DELETED", object);
    }

    /// A `BOOKMARK` as the API server sends it: an empty object of the watched kind carrying
    /// only the `resourceVersion`.
    pub fn bookmark(&self, kind: &str, resource_version: &str) {
        let mut object = json!({
            "kind": kind,
            "apiVersion": "v1",
            "metadata": {"resourceVersion": resource_version, "creationTimestamp": null},
        });
        if kind == "Pod" {
            object["spec"] = json!({"containers": null});
            object["status"] = json!({});
        }
        self.event("BOOKMARK", &object);
    }

    /// The `ERROR` event for a `resourceVersion` that fell out of the API server's window.
    pub fn expired(&self, resource_version: &str) {
        let status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {resource_version} (9999)"),
            "reason": "Expired",
            "code": 410,
        });
        self.event("ERROR", &status);
    }

    /// Half an event, then the connection closes without the chunked terminator. Everything
    /// sent before is flushed first: hyper discards what it buffered when a body fails.
    pub fn drop_mid_event(self) {
        let partial = Bytes::from_static(b"{\"type\":\"MODIFIED\",\"object\":{\"kind\":\"Po");
        let _ = self
            .tx
            .unbounded_send(Feed::Chunk(Ok(Frame::data(partial))));
        let _ = self.tx.unbounded_send(Feed::Flush);
        let _ = self
            .tx
            .unbounded_send(Feed::Chunk(Err(std::io::Error::other(
                "stream dropped by the test",
            ))));
    }

    /// Whether the client went away (connection closed).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[derive(Debug)]
struct ResourceState {
    list: ListReply,
    /// Replies for the next list requests, before `list`.
    list_once: VecDeque<ListReply>,
    /// HTTP statuses for the next watch requests.
    watch_rejections: VecDeque<u16>,
    /// Watches opened and not yet taken by the test.
    opened: VecDeque<Watch>,
}

#[derive(Debug, Default)]
struct State {
    requests: Vec<Recorded>,
    resources: HashMap<String, ResourceState>,
    down: bool,
    connections: Vec<AbortHandle>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled after every request.
    changed: Notify,
    /// Per resource: lists wait while `false`.
    list_gates: HashMap<String, watch::Sender<bool>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake API server state")
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FakeApiServer {
    /// Serves empty lists of pods and namespaces at resourceVersion "1" until told otherwise.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut resources = HashMap::new();
        let mut list_gates = HashMap::new();
        for resource in [PODS, NAMESPACES] {
            resources.insert(
                resource.to_owned(),
                ResourceState {
                    list: ListReply::items("1", Vec::new()),
                    list_once: VecDeque::new(),
                    watch_rejections: VecDeque::new(),
                    opened: VecDeque::new(),
                },
            );
            list_gates.insert(resource.to_owned(), watch::Sender::new(true));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                resources,
                ..State::default()
            }),
            changed: Notify::new(),
            list_gates,
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        FakeApiServer {
            addr,
            shared,
            accept,
        }
    }

    /// A real `kube` client for this server.
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("client")
    }

    fn with_resource<T>(&self, resource: &str, f: impl FnOnce(&mut ResourceState) -> T) -> T {
        let mut state = self.shared.lock();
        f(state.resources.get_mut(resource).expect("known resource"))
    }

    /// What every later list of `resource` returns.
    pub fn set_list(&self, resource: &str, reply: ListReply) {
        self.with_resource(resource, |r| r.list = reply);
    }

    /// What the next list of `resource` returns (once), before the `set_list` reply.
    pub fn list_once(&self, resource: &str, reply: ListReply) {
        self.with_resource(resource, |r| r.list_once.push_back(reply));
    }

    /// Answers the next watch request of `resource` with this HTTP status and a `Status` body.
    pub fn reject_watch(&self, resource: &str, code: u16) {
        self.with_resource(resource, |r| r.watch_rejections.push_back(code));
    }

    /// Lists of `resource` wait (`true`) until released (`false`).
    pub fn hold_lists(&self, resource: &str, hold: bool) {
        self.shared.list_gates[resource].send_replace(!hold);
    }

    /// Stops answering (`true`): open connections are cut, new requests get their connection
    /// closed without a response. `false` serves again.
    pub fn set_down(&self, down: bool) {
        let mut state = self.shared.lock();
        state.down = down;
        if down {
            for connection in state.connections.drain(..) {
                connection.abort();
            }
            for resource in state.resources.values_mut() {
                resource.opened.clear();
            }
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Requests of `resource` (lists when `watch` is false, watches when true).
    pub fn requests_of(&self, resource: &str, watch: bool) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.resource == resource && r.watch == watch)
            .collect()
    }

    /// Waits until `done` holds for the recorded requests.
    pub async fn wait_for_requests(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&[Recorded]) -> bool,
    ) {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(&self.shared.lock().requests) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(within, wait).await.is_err() {
            panic!(
                "timed out waiting for {what}; requests: {:#?}",
                self.requests()
            );
        }
    }

    /// The next watch of `resource` the client opens (in order of arrival).
    pub async fn next_watch(&self, resource: &str, within: Duration) -> Watch {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let opened = self.with_resource(resource, |r| r.opened.pop_front());
                if let Some(watch) = opened {
                    return watch;
                }
                changed.await;
            }
        };
        match tokio::time::timeout(within, wait).await {
            Ok(watch) => watch,
            Err(_) => panic!(
                "timed out waiting for a {resource} watch; requests: {:#?}",
                self.requests()
            ),
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.shared.lock().connections.drain(..) {
            connection.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service_shared = Arc::clone(&shared);
        let service = hyper::service::service_fn(move |request| {
            let shared = Arc::clone(&service_shared);
            async move { handle(&shared, request).await }
        });
        let connection = tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let mut state = shared.lock();
        state.connections.retain(|c| !c.is_finished());
        state.connections.push(connection.abort_handle());
    }
}

/// The error that makes hyper close the connection without a response.
#[derive(Debug)]
struct NoAnswer;

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the fake API server is down")
    }
}

impl std::error::Error for NoAnswer {}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Result<Response<Body>, NoAnswer> {
    let path = request.uri().path().to_owned();
    let raw_query = request.uri().query().unwrap_or_default().to_owned();
    let query = decode_query(&raw_query);
    let watch = query.iter().any(|(k, v)| k == "watch" && v == "true");
    let resource = path.strip_prefix("/api/v1/").unwrap_or(&path).to_owned();
    let recorded = Recorded {
        resource: resource.clone(),
        watch,
        raw_query,
        query,
        status: 0,
    };
    let known = shared.lock().resources.contains_key(&resource);
    let id = record(shared, recorded.clone());
    if !known {
        answered(shared, id, 404);
        return Ok(status_response(
            404,
            "NotFound",
            &format!("no route {path}"),
        ));
    }
    if shared.lock().down {
        return Err(NoAnswer);
    }
    if watch {
        return Ok(open_watch(shared, id, recorded));
    }
    // Lists may be held by the test.
    let mut gate = shared.list_gates[&resource].subscribe();
    let _ = gate.wait_for(|open| *open).await;
    if shared.lock().down {
        return Err(NoAnswer);
    }
    let reply = {
        let mut state = shared.lock();
        let r = state.resources.get_mut(&resource).expect("known resource");
        r.list_once.pop_front().unwrap_or_else(|| r.list.clone())
    };
    let response = match reply {
        ListReply::Status(code) => {
            answered(shared, id, code);
            status_response(code, "Expired", "list refused by the test")
        }
        ListReply::Pages {
            resource_version,
            pages,
        } => {
            answered(shared, id, 200);
            let page: usize = recorded
                .param("continue")
                .and_then(|token| token.strip_prefix("page-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let items = pages.get(page).cloned().unwrap_or_default();
            let mut metadata = json!({"resourceVersion": resource_version});
            if page + 1 < pages.len() {
                metadata["continue"] = json!(format!("page-{}", page + 1));
            }
            let kind = if resource == PODS {
                "PodList"
            } else {
                "NamespaceList"
            };
            let list =
                json!({"kind": kind, "apiVersion": "v1", "metadata": metadata, "items": items});
            json_response(StatusCode::OK, &list)
        }
    };
    Ok(response)
}

fn open_watch(shared: &Shared, id: usize, mut recorded: Recorded) -> Response<Body> {
    let mut state = shared.lock();
    let r = state
        .resources
        .get_mut(&recorded.resource)
        .expect("known resource");
    if let Some(code) = r.watch_rejections.pop_front() {
        drop(state);
        answered(shared, id, code);
        return status_response(code, "Expired", "watch refused by the test");
    }
    let (tx, rx) = mpsc::unbounded::<Feed>();
    // A pending body makes hyper flush what it has written.
    let rx = rx.filter_map(|feed| async move {
        match feed {
            Feed::Chunk(chunk) => Some(chunk),
            Feed::Flush => {
                tokio::task::yield_now().await;
                None
            }
        }
    });
    recorded.status = 200;
    r.opened.push_back(Watch {
        request: recorded,
        tx,
    });
    drop(state);
    answered(shared, id, 200);
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(Box::pin(rx))));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Records a request on arrival; returns its number for [`answered`].
fn record(shared: &Shared, recorded: Recorded) -> usize {
    let id = {
        let mut state = shared.lock();
        state.requests.push(recorded);
        state.requests.len() - 1
    };
    shared.changed.notify_waiters();
    id
}

fn answered(shared: &Shared, id: usize, status: u16) {
    if let Some(request) = shared.lock().requests.get_mut(id) {
        request.status = status;
    }
    shared.changed.notify_waiters();
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    let status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &status,
    )
}

fn decode_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
