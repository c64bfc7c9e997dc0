//! `observe`: decisions and DNS answers as they happen, from the running gateway.
//!
//! - `bus`: the history ring and the per-subscriber queues the JSON lines are tapped into
//!   (through [`egressgate_log::LineTap`], the bytes already serialized for stdout).
//! - `filter`: the request of `POST /v1/observe` and the [`Filter`] it becomes.
//! - `endpoint`: the streaming endpoint on the admin socket.
//! - `command`: `egressgate observe`, the client; `format`: one readable line per decision.

mod bus;
mod command;
mod endpoint;
mod filter;
mod format;

pub use bus::{Bus, BusMetrics, Full, Item, Subscription};
pub use command::{command, ObserveArgs};
pub use endpoint::{handle, HEARTBEAT, STALL};
pub use filter::{Filter, ObserveRequest};

#[cfg(test)]
mod tests;
