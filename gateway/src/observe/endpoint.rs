//! `POST /v1/observe` on the admin socket: an [`ObserveRequest`] in, the matching lines out as
//! chunked JSON lines (`application/x-ndjson`), from the history and then, with `follow`, as
//! they happen.
//!
//! Each stream is one task between its [`Subscription`] and the response body. It never holds
//! up the data path (the bus drops what its queue cannot take, and the task says so with a
//! `dropped` line), and it never holds resources for a client that is gone or stopped reading:
//! a blank line every [`HEARTBEAT`] without output finds a closed connection, and a client that
//! takes no bytes for [`STALL`] is cut off.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::SinkExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use tokio::time::MissedTickBehavior;

use super::bus::{Bus, Item, Subscription};
use super::filter::{Filter, ObserveRequest};
use crate::admin_socket::{self, AdminRequest, Body};
use crate::identity::Identities;
use crate::store::Store;

/// A following stream with nothing to send writes a blank line this often, so that a closed
/// connection is noticed (and its subscription freed) even on a quiet gateway.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// A client that takes no bytes for this long is cut off (its queue and connection freed).
pub const STALL: Duration = Duration::from_secs(30);

/// Frames between the stream's task and hyper: a little slack, the bus queue does the rest.
const BODY_FRAMES: usize = 16;

/// Handles one request.
pub fn handle(bus: &Bus, store: &Arc<Store>, request: &AdminRequest) -> Response<Body> {
    let query: ObserveRequest = if request.body.iter().all(u8::is_ascii_whitespace) {
        ObserveRequest::default()
    } else {
        match serde_json::from_slice(&request.body) {
            Ok(query) => query,
            Err(e) => return admin_socket::error(StatusCode::BAD_REQUEST, e.to_string()),
        }
    };
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(e) => return admin_socket::error(StatusCode::BAD_REQUEST, e),
    };
    let since = query.since_seconds.map(Duration::from_secs);
    let subscription = match bus.subscribe(since, query.follow) {
        Ok(subscription) => subscription,
        Err(full) => return admin_socket::error(StatusCode::SERVICE_UNAVAILABLE, full.to_string()),
    };
    let (frames, body) = mpsc::channel(BODY_FRAMES);
    let store = Arc::clone(store);
    tokio::spawn(stream(subscription, filter, store, frames));
    let body = StreamBody::new(body).boxed();
    let mut response = Response::new(body);
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

type Frames = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

/// Copies matching lines from `subscription` into the body until the backlog ends (not
/// following), the client is gone, or it stalls.
async fn stream(
    mut subscription: Subscription,
    filter: Filter,
    store: Arc<Store>,
    mut frames: Frames,
) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut wrote = false;
    loop {
        let item = tokio::select! {
            item = subscription.next() => item,
            _ = heartbeat.tick(), if subscription.follows() => {
                if !std::mem::take(&mut wrote) && !send(&mut frames, Bytes::from_static(b"\n")).await {
                    return;
                }
                continue;
            }
        };
        let bytes = match item {
            None => return,
            Some(Item::Line(line)) => {
                if !wanted(&filter, &line, &store.current().identities) {
                    continue;
                }
                line
            }
            Some(Item::Dropped(lines)) => dropped_line(lines),
        };
        if !send(&mut frames, bytes).await {
            return;
        }
        wrote = true;
    }
}

fn wanted(filter: &Filter, line: &Bytes, identities: &Identities) -> bool {
    serde_json::from_slice::<Value>(line).is_ok_and(|value| filter.matches(&value, identities))
}

/// `false` when the client is gone or took nothing for [`STALL`].
async fn send(frames: &mut Frames, bytes: Bytes) -> bool {
    matches!(
        tokio::time::timeout(STALL, frames.send(Ok(Frame::data(bytes)))).await,
        Ok(Ok(()))
    )
}

/// The line a stream gets where it lost lines: `{"time":…,"event":"dropped","lines":N}`.
fn dropped_line(lines: u64) -> Bytes {
    #[derive(Serialize)]
    struct Dropped {
        time: String,
        event: &'static str,
        lines: u64,
    }
    let mut bytes = serde_json::to_vec(&Dropped {
        time: egressgate_log::rfc3339_now(),
        event: "dropped",
        lines,
    })
    .unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}
