//! `POST /v1/explain` on the admin socket: a [`Query`] in, an [`Explanation`] out, decided with
//! the running gateway's policies, identities, name table and settings at this moment.
//! Nothing is changed: no record is kept alive, no counter moves.

use std::sync::Arc;

use egressgate_dns_shim::NameTable;
use hyper::{Response, StatusCode};

use super::query::Query;
use super::trace::{self, ExplainError, Records, Settings};
use crate::admin_socket::{self, AdminRequest, Body};
use crate::store::Store;

/// The endpoint's path.
pub const PATH: &str = "/v1/explain";

/// Answers one explain request.
pub async fn handle(
    request: AdminRequest,
    store: Arc<Store>,
    table: Arc<NameTable>,
    settings: Settings,
) -> Response<Body> {
    let query: Query = match serde_json::from_slice(&request.body) {
        Ok(query) => query,
        Err(e) => {
            return admin_socket::error(
                StatusCode::BAD_REQUEST,
                format!("not an explain query: {e}"),
            )
        }
    };
    let asked = match query.check() {
        Ok(asked) => asked,
        Err(e) => return admin_socket::error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Explaining a name walks the table under its read lock: off the async workers.
    let explained = tokio::task::spawn_blocking(move || {
        let snapshot = store.current();
        trace::explain(&snapshot, &table, &asked, settings, Records::Live)
    })
    .await;
    match explained {
        Ok(Ok(explanation)) => admin_socket::json(StatusCode::OK, &explanation),
        Ok(Err(e @ ExplainError::UnknownPod { .. })) => {
            admin_socket::error(StatusCode::NOT_FOUND, e.to_string())
        }
        Ok(Err(e @ ExplainError::NotResolved { .. })) => {
            admin_socket::error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Err(e) => admin_socket::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("explain failed: {e}"),
        ),
    }
}
