//! The public contract of Backhaul: the canonical warehouse event (its v1 JSON form and
//! validation), the record the agent stamps on each accepted event, the postcard wire frames
//! between agent and relay, the MQTT topic names, the answers and requests of both services'
//! admin APIs, and the configuration vocabulary (secrets, byte sizes, precise config errors)
//! that both services share.

pub mod admin;
#[cfg(feature = "service")]
pub mod admin_access;
#[cfg(feature = "admin-client")]
pub mod admin_client;
pub mod config;
pub mod event;
pub mod frame;
#[cfg(feature = "service")]
pub mod http_listener;
pub mod log_rate;
#[cfg(feature = "service")]
pub mod service;
pub mod signing;
pub mod stamped;
pub mod topics;

pub use event::{Event, EventType, MAX_EVENT_BYTES, MAX_STRING_CHARS, Violation, Violations};
pub use frame::{
    AckFrame, BatchEntry, BatchFrame, BatchRefusal, Compression, DayTally, EventOutcome,
    FrameError, Outcome, OutcomeFrame, Refusal, RefusalAckFrame, RefusalFrame, TallyFrame,
    WaitingAtSite,
};
pub use stamped::{Epoch, OrderingKey, StampedEvent};
