//! Fuzz target `tryton_rpc`: how the relay sorts an answer of Tryton's JSON-RPC (HTTP status,
//! `Retry-After` header and body) into a result, a login to renew, a warning to acknowledge,
//! or a transient, throttled, user or request error.
//!
//! Input: two bytes of status (mostly 200, the interesting case), one byte of `Retry-After`
//! length and that many bytes, then the body as text.
//!
//! Asserts: no panic; every error reason stays short (Tryton's messages can be tens of
//! kilobytes and end up in the dead-letter queue); a 200 whose body is a JSON object with a
//! `result` and no `error` is that result; 401 always asks for a fresh login.

#![no_main]

use backhaul_relay::connector::tryton::{Answer, RpcError, read_answer};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const METHOD: &str = "model.stock.move.create";
const ENDPOINT: &str = "http://127.0.0.1:8000/backhaul/";
/// The longest quoted text (2000 characters and an ellipsis) and the words around it.
const MAX_REASON_CHARS: usize = 2001 + 300;

fuzz_target!(|data: &[u8]| {
    let Some((&[hi, lo], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let code = u16::from_be_bytes([hi, lo]);
    // Most inputs are 200: the body is what is interesting.
    let status = if hi < 0xC0 { 200 } else { code % 1000 };
    let Some((&len, rest)) = rest.split_first() else {
        return;
    };
    let (retry_after, body) = rest.split_at(usize::from(len).min(rest.len()));
    let retry_after = std::str::from_utf8(retry_after).ok();
    let body = String::from_utf8_lossy(body);

    let answer = read_answer(METHOD, status, retry_after, &body, ENDPOINT);
    if let Answer::Failed(error) = &answer {
        let reason = match error {
            RpcError::Transient { reason, .. } | RpcError::Throttled { reason, .. } => reason,
            RpcError::User(message) | RpcError::Request(message) => message,
        };
        assert!(
            reason.chars().count() <= MAX_REASON_CHARS,
            "a reason of {} characters",
            reason.chars().count()
        );
    }
    if status == 401 {
        assert!(matches!(answer, Answer::Unauthorized));
    }
    if status == 200
        && let Ok(Value::Object(object)) = serde_json::from_str::<Value>(&body)
        && matches!(object.get("error"), None | Some(Value::Null))
        && let Some(result) = object.get("result")
    {
        assert!(
            matches!(&answer, Answer::Result(r) if r == result),
            "{answer:?}"
        );
    }
});
