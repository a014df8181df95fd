//! The cloud relay: takes batches off the broker, stores them durably in its outbox,
//! acknowledges them to the agent, and delivers them to the ERP.

pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod connector;
pub mod engine;
pub mod intake;
pub mod metrics;
pub mod outbox;
pub mod reconcile;
pub mod service;
pub mod trace;
