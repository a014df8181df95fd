//! A stand-in ERP with a REST API that fails on demand: the one place where the tests do not
//! use a real ERP, because a real one cannot be told to answer 500, 429 or nothing at will.
//!
//! It behaves like an ERP with idempotency keys: the first successful POST of a key has an
//! effect (recorded, parsed and as the exact text received); a repeated key is answered 200
//! without a second effect.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How the stand-in answers the next requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Ok,
    /// 500 Internal Server Error.
    Fail,
    /// 503 Service Unavailable, as an ERP down for maintenance answers.
    Unavailable,
    /// 429 with `Retry-After: secs`.
    Throttle(u64),
    /// Holds the request this long, then closes without answering (and without effect).
    Hang(Duration),
    /// Answers correctly after this delay.
    Slow(Duration),
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// When the request arrived (a held request is listed where it arrived).
    pub at: Instant,
    pub key: String,
    pub body: Value,
    /// The body exactly as received (JSON numbers keep every digit here).
    pub text: String,
    /// The status the stand-in answered; 0 for a request it held and closed unanswered.
    pub status: u16,
    /// The index in [`ErpStandIn::effects`] of the effect this request made; `None` when it
    /// made none (a failure, a hung request, or a key already there, answered 200).
    pub effect: Option<usize>,
}

#[derive(Default)]
struct State {
    mode: Option<Mode>,
    requests: Vec<Request>,
    /// Effects in the order they happened: the events the ERP now holds.
    effects: Vec<Value>,
    /// The same effects as the exact body text received.
    effect_texts: Vec<String>,
    keys: HashMap<String, usize>,
    /// SKUs refused with 422 (unknown master data) until they are "created".
    unknown_skus: Vec<String>,
}

#[derive(Clone)]
pub struct ErpStandIn {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl ErpStandIn {
    pub fn start() -> ErpStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("stand-in listen");
        let port = listener.local_addr().expect("stand-in address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, state));
            }
        });
        ErpStandIn { port, state }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/events", self.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = Some(mode);
    }

    pub fn refuse_sku(&self, sku: &str) {
        self.state
            .lock()
            .unwrap()
            .unknown_skus
            .push(sku.to_string());
    }

    /// "Creates the product": the SKU is accepted from now on.
    pub fn accept_sku(&self, sku: &str) {
        self.state.lock().unwrap().unknown_skus.retain(|s| s != sku);
    }

    /// Forgets the record of an idempotency key, as if someone deleted it in the ERP: its
    /// lookup answers 404 (the effect stays listed in [`ErpStandIn::effects`]).
    pub fn forget(&self, key: &str) {
        self.state.lock().unwrap().keys.remove(key);
    }

    pub fn effects(&self) -> Vec<Value> {
        self.state.lock().unwrap().effects.clone()
    }

    /// The effects as the exact body text received, in the order they happened.
    pub fn effect_texts(&self) -> Vec<String> {
        self.state.lock().unwrap().effect_texts.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// Reads one HTTP/1.1 request: its request line, headers (lower-case names) and body (by
/// Content-Length). `None` once the client has gone.
pub(crate) fn read_request(
    reader: &mut impl BufRead,
) -> Option<(String, HashMap<String, String>, Vec<u8>)> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some((request_line, headers, body))
}

fn serve(stream: TcpStream, state: Arc<Mutex<State>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut writer = write_half;
    loop {
        let Some((request_line, headers, body)) = read_request(&mut reader) else {
            return;
        };
        // GET …/{key}: whether the ERP holds the record of that idempotency key.
        if let Some(path) = request_line.strip_prefix("GET ") {
            let path = path.split_whitespace().next().unwrap_or_default();
            let key = path.rsplit('/').next().unwrap_or_default();
            let held = state.lock().unwrap().keys.contains_key(key);
            let (status, text) = if held {
                ("200 OK", format!(r#"{{"id":{key:?}}}"#))
            } else {
                ("404 Not Found", r#"{"error":"no such event"}"#.to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        let arrived = Instant::now();
        let key = headers.get("idempotency-key").cloned().unwrap_or_default();
        let received = String::from_utf8_lossy(&body).into_owned();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mode = state.lock().unwrap().mode.clone().unwrap_or(Mode::Ok);
        let (status, extra, text) = match mode {
            Mode::Fail => (
                500,
                String::new(),
                r#"{"error":"internal error"}"#.to_string(),
            ),
            Mode::Unavailable => (
                503,
                String::new(),
                r#"{"error":"down for maintenance"}"#.to_string(),
            ),
            Mode::Throttle(secs) => (
                429,
                format!("Retry-After: {secs}\r\n"),
                r#"{"error":"slow down"}"#.to_string(),
            ),
            Mode::Hang(time) => {
                std::thread::sleep(time);
                record(&state, arrived, key, body, received, 0);
                return;
            }
            Mode::Slow(time) => {
                std::thread::sleep(time);
                effect(&state, arrived, &key, &body, &received)
            }
            Mode::Ok => effect(&state, arrived, &key, &body, &received),
        };
        if status >= 400 {
            record(&state, arrived, key, body, received, status);
        }
        let reason = match status {
            200 => "OK",
            201 => "Created",
            422 => "Unprocessable Entity",
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
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

fn record(
    state: &Arc<Mutex<State>>,
    at: Instant,
    key: String,
    body: Value,
    text: String,
    status: u16,
) {
    let mut s = state.lock().unwrap();
    s.requests.push(Request {
        at,
        key,
        body,
        text,
        status,
        effect: None,
    });
    // Listed in arrival order, however long a request was held.
    s.requests.sort_by_key(|r| r.at);
}

/// Applies a POST: refuses unknown SKUs, dedups by key, records the effect.
fn effect(
    state: &Arc<Mutex<State>>,
    at: Instant,
    key: &str,
    body: &Value,
    received: &str,
) -> (u16, String, String) {
    let mut s = state.lock().unwrap();
    let sku = body["sku"].as_str().unwrap_or("");
    let (status, text, effect) = if s.unknown_skus.iter().any(|u| u == sku) {
        (422, format!(r#"{{"error":"unknown product {sku}"}}"#), None)
    } else if let Some(index) = s.keys.get(key) {
        (
            200,
            format!(r#"{{"id":"ERP-{index}","note":"already there"}}"#),
            None,
        )
    } else {
        let index = s.effects.len();
        s.effects.push(body.clone());
        s.effect_texts.push(received.to_string());
        s.keys.insert(key.to_string(), index);
        (201, format!(r#"{{"id":"ERP-{index}"}}"#), Some(index))
    };
    if status < 400 {
        s.requests.push(Request {
            at,
            key: key.to_string(),
            body: body.clone(),
            text: received.to_string(),
            status,
            effect,
        });
        s.requests.sort_by_key(|r| r.at);
    }
    (status, String::new(), text)
}
