//! The cloud relay: takes batches off the broker, stores them durably in its outbox,
//! acknowledges them to the agent, and delivers them to the ERP.

pub mod config;
pub mod service;
pub mod shutdown;
