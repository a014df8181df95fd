//! Fuzz target `config`: loading the agent's and the relay's configuration from TOML text, and
//! the relay's site-keys file, as an operator may write them.
//!
//! Each input is parsed as both configurations (`parse_toml`, what `load` does first), and,
//! when it names no file to read (no key with `file` in its name: secret files, password
//! files, TLS material), loaded through the services' own `load` from a temporary file, which
//! adds every check and secret the services make at start. Files are left out so that a
//! fuzzed path never makes the target read a device or the machine's own files.
//!
//! Asserts: no panic; `load` refuses whatever `parse_toml` refuses, with the same error; every
//! error names the file; a site-keys file is read or refused, never a panic.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use backhaul_agent::config::AgentConfig;
use backhaul_events::config::{ConfigError, parse_toml};
use backhaul_events::signing::Keyring;
use backhaul_relay::config::RelayConfig;
use libfuzzer_sys::fuzz_target;

/// This process's scratch file for `load`.
fn scratch() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        std::env::temp_dir().join(format!("backhaul-fuzz-config-{}.toml", std::process::id()))
    })
}

/// Whether any key of the TOML document, at any depth, names a file.
fn names_a_file(value: &toml::Value) -> bool {
    match value {
        toml::Value::Table(table) => table
            .iter()
            .any(|(key, value)| key.contains("file") || names_a_file(value)),
        toml::Value::Array(items) => items.iter().any(names_a_file),
        _ => false,
    }
}

fn check_error(error: &ConfigError, file: &Path) {
    let text = error.to_string();
    assert!(
        text.starts_with(&file.display().to_string()),
        "an error that does not name the file: {text}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(ring) = Keyring::from_toml(text) {
        assert_eq!(ring.len() == 0, ring.is_empty());
    }

    let file = scratch();
    let agent = parse_toml::<AgentConfig>(file, text);
    let relay = parse_toml::<RelayConfig>(file, text);
    for error in [agent.as_ref().err(), relay.as_ref().err()]
        .into_iter()
        .flatten()
    {
        check_error(error, file);
    }

    let loadable = match text.parse::<toml::Table>() {
        Ok(table) => !names_a_file(&toml::Value::Table(table)),
        // Not TOML: `load` must refuse it as `parse_toml` did, and reads nothing else.
        Err(_) => true,
    };
    if !loadable || std::fs::write(file, text).is_err() {
        return;
    }
    match (&agent, AgentConfig::load(file)) {
        (Err(parsed), Err(loaded)) => assert_eq!(parsed.to_string(), loaded.to_string()),
        (Err(parsed), Ok(_)) => panic!("load took what parse_toml refused: {parsed}"),
        (Ok(_), Err(loaded)) => check_error(&loaded, file),
        (Ok(_), Ok(loaded)) => assert_eq!(loaded.file, file),
    }
    match (&relay, RelayConfig::load(file)) {
        (Err(parsed), Err(loaded)) => assert_eq!(parsed.to_string(), loaded.to_string()),
        (Err(parsed), Ok(_)) => panic!("load took what parse_toml refused: {parsed}"),
        (Ok(_), Err(loaded)) => check_error(&loaded, file),
        (Ok(_), Ok(loaded)) => assert_eq!(loaded.file, file),
    }
});
