//! Who may connect to the MQTT endpoint: users with a password from the config (a secret), and
//! users from a Mosquitto password file (hashes as `mosquitto_passwd` writes them), so a site
//! that moves its scanners from Mosquitto keeps its password file.
//!
//! Each line is `username:hash`; `$7$ROUNDS$SALT$HASH` is PBKDF2-HMAC-SHA512 (Mosquitto 2),
//! `$6$SALT$HASH` is SHA-512 of the password followed by the salt (Mosquitto 1.x), both in
//! standard base64. Blank lines and lines starting with `#` are skipped.

use std::collections::HashMap;
use std::path::Path;

use backhaul_events::config::Secret;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha512};

/// How one user's password is checked.
#[derive(Debug, Clone)]
enum Credential {
    Secret(Secret),
    Hash(PasswordHash),
}

/// The users of the MQTT endpoint; when there are none, anonymous clients are accepted.
#[derive(Debug, Clone, Default)]
pub struct MqttUsers {
    users: HashMap<String, Credential>,
}

impl MqttUsers {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Adds a user whose password is a secret; `Err` when the name is taken.
    pub fn add_secret(&mut self, user: &str, password: Secret) -> Result<(), String> {
        self.add(user, Credential::Secret(password))
    }

    /// Adds the users of a password file; `Err` names a user that is already there.
    pub fn add_hashes(&mut self, users: HashMap<String, PasswordHash>) -> Result<(), String> {
        for (user, hash) in users {
            self.add(&user, Credential::Hash(hash))?;
        }
        Ok(())
    }

    fn add(&mut self, user: &str, credential: Credential) -> Result<(), String> {
        if self.users.insert(user.to_string(), credential).is_some() {
            return Err(format!("user {user:?} is defined twice"));
        }
        Ok(())
    }

    pub fn check(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(Credential::Secret(secret)) => {
                constant_time_eq(secret.expose().as_bytes(), password)
            }
            Some(Credential::Hash(hash)) => hash.verify(password),
            None => false,
        }
    }
}

/// One user's stored password hash.
#[derive(Clone)]
pub enum PasswordHash {
    Pbkdf2Sha512 {
        rounds: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    SaltedSha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<password hash>")
    }
}

impl PasswordHash {
    /// Parses the part after `username:`.
    pub fn parse(text: &str) -> Result<PasswordHash, String> {
        let decode = |what: &str, b64: &str| {
            STANDARD
                .decode(b64)
                .map_err(|e| format!("the {what} is not base64: {e}"))
        };
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "7", rounds, salt, hash] => {
                let rounds: u32 = rounds
                    .parse()
                    .map_err(|_| format!("the round count {rounds:?} is not a number"))?;
                if rounds == 0 {
                    return Err("the round count must be at least 1".into());
                }
                Ok(PasswordHash::Pbkdf2Sha512 {
                    rounds,
                    salt: decode("salt", salt)?,
                    hash: decode("hash", hash)?,
                })
            }
            ["", "6", salt, hash] => Ok(PasswordHash::SaltedSha512 {
                salt: decode("salt", salt)?,
                hash: decode("hash", hash)?,
            }),
            _ => Err(
                "expected a hash as mosquitto_passwd writes it: $7$ROUNDS$SALT$HASH or $6$SALT$HASH"
                    .into(),
            ),
        }
    }

    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Pbkdf2Sha512 { rounds, salt, hash } => {
                let mut derived = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *rounds, &mut derived);
                constant_time_eq(&derived, hash)
            }
            PasswordHash::SaltedSha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                constant_time_eq(&digest.finalize(), hash)
            }
        }
    }
}

/// Compares without stopping at the first difference, so the time taken says nothing about
/// how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a password file; an error names the line and what is wrong with it (never the hash).
pub fn load(path: &Path) -> Result<HashMap<String, PasswordHash>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |why: String| format!("line {}: {why}", number + 1);
        let Some((user, hash)) = line.split_once(':') else {
            return Err(at("expected username:hash".into()));
        };
        if user.is_empty() {
            return Err(at("the username is empty".into()));
        }
        let hash = PasswordHash::parse(hash).map_err(|why| at(format!("user {user:?}: {why}")))?;
        if users.insert(user.to_string(), hash).is_some() {
            return Err(at(format!("user {user:?} is listed twice")));
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_mosquitto_formats_verify() {
        // Derived the way mosquitto_passwd 2.0 derives it (password "scan-7").
        let salt = STANDARD.encode(b"0123456789ab");
        let mut derived = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha512>(b"scan-7", b"0123456789ab", 101, &mut derived);
        let line = format!("$7$101${salt}${}", STANDARD.encode(derived));
        let hash = PasswordHash::parse(&line).unwrap();
        assert!(hash.verify(b"scan-7"));
        assert!(!hash.verify(b"scan-8"));

        let mut digest = Sha512::new();
        digest.update(b"old");
        digest.update(b"salty");
        let line = format!(
            "$6${}${}",
            STANDARD.encode(b"salty"),
            STANDARD.encode(digest.finalize())
        );
        let hash = PasswordHash::parse(&line).unwrap();
        assert!(hash.verify(b"old"));
        assert!(!hash.verify(b"new"));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert_eq!(
            PasswordHash::parse("plain").unwrap_err(),
            "expected a hash as mosquitto_passwd writes it: $7$ROUNDS$SALT$HASH or $6$SALT$HASH"
        );
        assert_eq!(
            PasswordHash::parse("$7$x$AA==$AA==").unwrap_err(),
            "the round count \"x\" is not a number"
        );
        assert!(
            PasswordHash::parse("$6$!!$AA==")
                .unwrap_err()
                .starts_with("the salt is not base64")
        );
    }
}
