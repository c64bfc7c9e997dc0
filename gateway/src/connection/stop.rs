//! Why a connection's stages ended before a rule allowed it: the typed denial every stage
//! returns. Its [`Reason`] group says whose doing it is; [`Detail`] says how, for the log.

use super::postgres::NegotiationFault;
use crate::decision::{PodFault, PolicyDenial, Reason};
use crate::peek::Invalid;

/// Why the stages ended without a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub reason: Reason,
    /// How, for `malformed` and some `protocol_mismatch`: the log's `detail`.
    pub detail: Option<Detail>,
}

/// What exactly was wrong with the first messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    /// A peeker refused the bytes.
    Invalid(Invalid),
    /// The PostgreSQL encryption negotiation went wrong.
    Negotiation(NegotiationFault),
}

impl Stop {
    pub fn new(reason: impl Into<Reason>) -> Self {
        Stop {
            reason: reason.into(),
            detail: None,
        }
    }

    /// A peeker refused the bytes.
    pub fn invalid(invalid: Invalid) -> Self {
        let reason = match invalid {
            // A pod speaking HTTP/2 to an HTTP/1 rule, or asking to switch to it (h2c): a
            // protocol it may not use, not garbage.
            Invalid::Http2Preface | Invalid::HttpUpgradeH2c => {
                Reason::Policy(PolicyDenial::ProtocolMismatch)
            }
            _ if invalid.is_smuggling() => Reason::Pod(PodFault::HttpSmuggling),
            _ => Reason::Pod(PodFault::Malformed),
        };
        Stop {
            reason,
            detail: Some(Detail::Invalid(invalid)),
        }
    }

    pub fn negotiation(fault: NegotiationFault) -> Self {
        Stop {
            reason: Reason::Pod(PodFault::Malformed),
            detail: Some(Detail::Negotiation(fault)),
        }
    }
}

impl Detail {
    /// The stable code of the log's `detail` field.
    pub fn code(&self) -> &'static str {
        match self {
            Detail::Invalid(invalid) => invalid.code(),
            Detail::Negotiation(fault) => fault.code(),
        }
    }
}
