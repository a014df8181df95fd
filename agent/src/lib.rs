//! The site agent: takes scans over MQTT and WMS events over HTTP, makes each durable in its
//! local log before acknowledging it, and forwards the log to the relay.

pub mod cli;
pub mod config;
pub mod forward;
pub mod http;
pub mod log;
pub mod metrics;
pub mod mqtt;
pub mod passwd;
pub mod salvage;
pub mod service;
pub mod site_broker;
