//! Per-site identity on the wire: a frame sealed with an HMAC-SHA256 under its site's key, so a
//! broker ACL mistake cannot let one site write as another and a leaked broker password alone
//! cannot inject events or forge the acknowledgement that makes an agent delete them.
//!
//! A sealed frame is `2`, the 32-byte MAC, then the frame's own bytes (version 1 and postcard):
//! the MAC covers exactly the bytes that are decoded, so nothing is re-encoded to check it,
//! and a relay or agent that does not know sealing refuses the frame as version 2 instead of
//! reading it unchecked. A site may have two keys at once, so that keys are rotated without
//! stopping: frames are sealed with the first, and either opens them.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The version byte of a sealed frame.
pub const SEALED_FRAME_VERSION: u8 = 2;
const MAC_LEN: usize = 32;
/// Bytes of key material at least (256 bits).
pub const MIN_KEY_BYTES: usize = 32;

/// Why a frame was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the frame is not signed, and this site's frames must be")]
    Unsigned,
    #[error("the frame's signature does not match any key of its site")]
    BadSignature,
    #[error("the frame is too short to hold a signature")]
    Truncated,
}

impl SealError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SealError::Unsigned => "unsigned",
            SealError::BadSignature => "bad_signature",
            SealError::Truncated => "bad_signature",
        }
    }
}

/// One site's keys: frames are sealed with the first, opened with any.
#[derive(Clone)]
pub struct SiteKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for SiteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} redacted keys>", self.0.len())
    }
}

impl SiteKeys {
    /// Keys from their hex text (64 hex digits or more each); one or two of them.
    pub fn from_hex(keys: &[&str]) -> Result<SiteKeys, String> {
        if keys.is_empty() || keys.len() > 2 {
            return Err(format!(
                "one key, or two while rotating (got {})",
                keys.len()
            ));
        }
        let mut parsed = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let bytes = decode_hex(key.trim())
                .ok_or_else(|| format!("key {}: hexadecimal digits expected", i + 1))?;
            if bytes.len() < MIN_KEY_BYTES {
                return Err(format!(
                    "key {}: at least {} hexadecimal digits (256 bits) expected, got {}",
                    i + 1,
                    MIN_KEY_BYTES * 2,
                    bytes.len() * 2
                ));
            }
            parsed.push(bytes);
        }
        Ok(SiteKeys(parsed))
    }

    fn mac(key: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"))
    }

    /// The frame sealed with the current key.
    pub fn seal(&self, frame: &[u8]) -> Vec<u8> {
        let mut mac = Self::mac(&self.0[0]);
        mac.update(frame);
        let tag = mac.finalize().into_bytes();
        let mut out = Vec::with_capacity(1 + MAC_LEN + frame.len());
        out.push(SEALED_FRAME_VERSION);
        out.extend_from_slice(&tag);
        out.extend_from_slice(frame);
        out
    }

    /// The frame inside a sealed one, if a key of this site sealed it (checked in constant
    /// time).
    pub fn open<'a>(&self, sealed: &'a [u8]) -> Result<&'a [u8], SealError> {
        match sealed.first() {
            Some(&SEALED_FRAME_VERSION) => {}
            _ => return Err(SealError::Unsigned),
        }
        if sealed.len() < 1 + MAC_LEN {
            return Err(SealError::Truncated);
        }
        let (tag, frame) = sealed[1..].split_at(MAC_LEN);
        for key in &self.0 {
            let mut mac = Self::mac(key);
            mac.update(frame);
            if mac.verify_slice(tag).is_ok() {
                return Ok(frame);
            }
        }
        Err(SealError::BadSignature)
    }
}

/// The keys of every site a relay serves, from its site-keys file: a TOML table of site id to
/// one hex key, or a list of two while rotating.
///
/// ```toml
/// wh-east = "5f0c…64 hex digits…"
/// wh-west = ["new key", "old key"]
/// ```
#[derive(Debug, Clone, Default)]
pub struct Keyring(std::collections::HashMap<String, SiteKeys>);

impl Keyring {
    /// Reads the file's text; an error names the site and the rule.
    pub fn from_toml(text: &str) -> Result<Keyring, String> {
        let table: toml::Table = text
            .parse()
            .map_err(|e| format!("not a TOML table of site = key: {e}"))?;
        let mut ring = std::collections::HashMap::new();
        for (site, value) in table {
            crate::topics::check_site_id(&site).map_err(|e| format!("{site:?}: expected {e}"))?;
            let keys: Vec<&str> = match &value {
                toml::Value::String(key) => vec![key.as_str()],
                toml::Value::Array(list) => list.iter().filter_map(toml::Value::as_str).collect(),
                _ => Vec::new(),
            };
            if keys.is_empty() {
                return Err(format!(
                    "{site}: a hex key, or a list of two while rotating, expected"
                ));
            }
            let keys = SiteKeys::from_hex(&keys).map_err(|e| format!("{site}: {e}"))?;
            ring.insert(site, keys);
        }
        Ok(Keyring(ring))
    }

    pub fn get(&self, site: &str) -> Option<&SiteKeys> {
        self.0.get(site)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether bytes are a sealed frame (as opposed to a plain one).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&SEALED_FRAME_VERSION)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn a_sealed_frame_opens_with_its_sites_keys_only() {
        let site = SiteKeys::from_hex(&[A]).unwrap();
        let other = SiteKeys::from_hex(&[B]).unwrap();
        let sealed = site.seal(b"\x01frame");
        assert_eq!(site.open(&sealed), Ok(&b"\x01frame"[..]));
        assert_eq!(other.open(&sealed), Err(SealError::BadSignature));
        assert_eq!(site.open(b"\x01frame"), Err(SealError::Unsigned));
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(site.open(&tampered), Err(SealError::BadSignature));
        assert_eq!(site.open(&sealed[..10]), Err(SealError::Truncated));
    }

    #[test]
    fn while_rotating_either_key_opens_and_the_first_seals() {
        let old = SiteKeys::from_hex(&[A]).unwrap();
        let rotating = SiteKeys::from_hex(&[B, A]).unwrap();
        let new = SiteKeys::from_hex(&[B]).unwrap();
        assert!(rotating.open(&old.seal(b"x")).is_ok());
        assert!(new.open(&rotating.seal(b"x")).is_ok());
        assert!(old.open(&new.seal(b"x")).is_err());
    }

    #[test]
    fn a_keyring_names_the_site_and_rule_it_refuses() {
        let ring = Keyring::from_toml(&format!(
            "wh-east = \"{A}\"\nwh-west = [\"{B}\", \"{A}\"]\n"
        ))
        .unwrap();
        assert_eq!(ring.len(), 2);
        let sealed = ring.get("wh-east").unwrap().seal(b"x");
        assert!(
            ring.get("wh-west").unwrap().open(&sealed).is_ok(),
            "rotation"
        );
        assert_eq!(
            Keyring::from_toml("wh-east = \"abcd\"").unwrap_err(),
            "wh-east: key 1: at least 64 hexadecimal digits (256 bits) expected, got 4"
        );
        assert!(
            Keyring::from_toml("WH = \"x\"")
                .unwrap_err()
                .starts_with("\"WH\": expected")
        );
        assert_eq!(
            Keyring::from_toml("wh = 3").unwrap_err(),
            "wh: a hex key, or a list of two while rotating, expected"
        );
    }

    #[test]
    fn keys_are_refused_naming_the_rule() {
        assert!(SiteKeys::from_hex(&[]).is_err());
        assert_eq!(
            SiteKeys::from_hex(&["abcd"]).unwrap_err(),
            "key 1: at least 64 hexadecimal digits (256 bits) expected, got 4"
        );
        assert_eq!(
            SiteKeys::from_hex(&[A, "zz"]).unwrap_err(),
            "key 2: hexadecimal digits expected"
        );
        assert!(SiteKeys::from_hex(&[A, B, A]).is_err());
    }
}
