//! A real Tryton 8.0 server as a child process, for the ERP connector's tests: each [`Tryton`]
//! copies the seeded template database (made by `cargo xtask test`, see xtask/src/tryton.rs)
//! into its own temporary directory, serves it on a free port, and offers the few JSON-RPC
//! reads the tests check the ERP's books with.
//!
//! The seed holds company 1 (Acme Logistics, USD), the parties CUST-A and SUPP-B with an
//! address each, the products SKU-001..SKU-010 (goods, unit, cost price 20), the warehouse
//! "WH" with its zones (IN, OUT, STO, lost and found) and the bin "STO-A1" under STO.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{ChildGuard, free_port, poll_until};

/// The database name, login and password of the seed.
pub const DATABASE: &str = "backhaul";
pub const USERNAME: &str = "admin";
pub const PASSWORD: &str = "admin";
/// The seed's company id.
pub const COMPANY: i64 = 1;

const INSTALL_HINT: &str = "run `cargo xtask test`, which installs Tryton into target/tryton-venv";

/// The cargo target directory: `$CARGO_TARGET_DIR`, else the one this test executable was built
/// in (`<target>/<profile>/deps/<test>`), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return workspace.join(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|dir| dir.join("tryton-venv").is_dir())
        .unwrap_or_else(|| workspace.join("target"))
}

/// The virtual environment with `trytond`; panics with how to make it when it is missing.
pub fn venv_dir() -> PathBuf {
    let venv = target_dir().join("tryton-venv");
    assert!(
        venv.join(".backhaul-ready").is_file() && venv.join("bin/trytond").is_file(),
        "Tryton is not installed in {}: {INSTALL_HINT}",
        venv.display()
    );
    venv
}

/// The seeded template database; panics with how to make it when it is missing.
pub fn seed_file() -> PathBuf {
    let seed = target_dir()
        .join("tryton-seed")
        .join(format!("{DATABASE}.sqlite"));
    assert!(
        seed.is_file(),
        "the seeded Tryton database {} is missing: {INSTALL_HINT}",
        seed.display()
    );
    seed
}

/// A Tryton server of this test, on its own copy of the seed. Killed when dropped.
pub struct Tryton {
    dir: TempDir,
    port: u16,
    child: Option<ChildGuard>,
    client: reqwest::blocking::Client,
    session: String,
    next_id: AtomicU64,
}

impl Tryton {
    /// Copies the seed, starts `trytond` on a free port and logs in (about 3 s).
    pub fn start() -> Tryton {
        let venv = venv_dir();
        let seed = seed_file();
        let dir = tempfile::Builder::new()
            .prefix("backhaul-tryton-test-")
            .tempdir()
            .expect("a temporary directory");
        std::fs::copy(&seed, dir.path().join(format!("{DATABASE}.sqlite")))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", seed.display()));
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client");
        let mut tryton = Tryton {
            dir,
            port: 0,
            child: None,
            client,
            session: String::new(),
            next_id: AtomicU64::new(1),
        };
        // Another test may take the port between free_port() and trytond's bind.
        for attempt in 1..=3 {
            tryton.port = free_port();
            match tryton.spawn_and_login(&venv) {
                Ok(()) => return tryton,
                Err(_) if attempt < 3 => {}
                Err(why) => panic!("trytond did not start: {why}\n{}", tryton.log()),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    fn spawn_and_login(&mut self, venv: &Path) -> Result<(), String> {
        let dir = self.dir.path();
        let config = dir.join("trytond.conf");
        std::fs::write(
            &config,
            format!(
                "[database]\nuri = sqlite://\npath = {}\n\n[web]\nlisten = 127.0.0.1:{}\n\n\
                 [session]\ntimeout = 3600\n",
                dir.display(),
                self.port
            ),
        )
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = std::fs::File::create(dir.join("trytond.log"))
            .map_err(|e| format!("cannot create the log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot share the log: {e}"))?;
        let mut command = Command::new(venv.join("bin/trytond"));
        command
            .arg("-c")
            .arg(&config)
            .args(["-d", DATABASE])
            // The seed's company has no time zone, so Tryton's today is the server's: pinned to
            // UTC, it is the day of `events::scan_ts` whatever zone the test machine is in.
            .env("TZ", "UTC")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let mut child = ChildGuard::spawn("trytond", &mut command);
        let started = poll_until(Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.child.try_wait() {
                return Some(Err(format!("trytond exited with {status}")));
            }
            // The log names the port once this server (not another one that took the port)
            // has bound it and loaded the database.
            let listening = format!("Running on http://127.0.0.1:{}", self.port);
            let log = std::fs::read_to_string(dir.join("trytond.log")).unwrap_or_default();
            log.contains(&listening).then_some(Ok(()))
        });
        match started {
            Some(Ok(())) => {}
            Some(Err(why)) => return Err(why),
            None => return Err("trytond did not listen within 60 s".into()),
        }
        self.child = Some(child);
        let answer = self.post(
            "common.db.login",
            json!([USERNAME, {"password": PASSWORD}, "en"]),
            false,
        )?;
        let result = answer
            .get("result")
            .ok_or_else(|| format!("login failed: {answer}"))?;
        let user = result.get(0).and_then(Value::as_i64);
        let token = result.get(1).and_then(Value::as_str);
        let (Some(user), Some(token)) = (user, token) else {
            return Err(format!("unexpected login answer {answer}"));
        };
        self.session = format!(
            "Session {}",
            BASE64.encode(format!("{USERNAME}:{user}:{token}"))
        );
        Ok(())
    }

    fn post(&self, method: &str, params: Value, authenticated: bool) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = self
            .client
            .post(self.rpc_url())
            .json(&json!({"id": id, "method": method, "params": params}));
        if authenticated {
            request = request.header("Authorization", &self.session);
        }
        let response = request.send().map_err(|e| format!("{method}: {e}"))?;
        let status = response.status();
        let text = response.text().map_err(|e| format!("{method}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{method}: HTTP {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{method}: {e}: {text}"))
    }

    /// The server's base URL, as the connector's `url` takes it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `[sink.tryton]` for this server as an operator would write it: the seed's login, parties
    /// and the bin A1 mapped to STO-A1, every tuning setting at its default.
    pub fn sink_config(&self) -> String {
        format!(
            r#"[sink.tryton]
url = "{}"
database = "{DATABASE}"
username = "{USERNAME}"
password = {{ value = "{PASSWORD}" }}
customer_party = "CUST-A"
supplier_party = "SUPP-B"
locations = {{ "A1" = "STO-A1" }}
"#,
            self.url()
        )
    }

    fn rpc_url(&self) -> String {
        format!("{}/{DATABASE}/rpc/", self.url())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("trytond.log")).unwrap_or_default()
    }

    /// Stops the server (SIGKILL), like a crash or an outage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
    }

    /// Puts the seed back and restarts the server on the same port: the ERP forgets every
    /// record and every session, as after a restore from backup.
    pub fn restart_from_seed(&mut self) {
        self.kill();
        let seed = seed_file();
        // trytond runs SQLite in WAL mode: the old journal must not outlive the file it
        // belongs to, or the copied seed reads as a malformed database.
        for suffix in ["-wal", "-shm"] {
            let _ =
                std::fs::remove_file(self.dir.path().join(format!("{DATABASE}.sqlite{suffix}")));
        }
        std::fs::copy(&seed, self.dir.path().join(format!("{DATABASE}.sqlite")))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", seed.display()));
        if let Err(why) = self.spawn_and_login(&venv_dir()) {
            panic!("trytond did not restart: {why}\n{}", self.log());
        }
    }

    /// Calls a model method with the company context appended; `Err` holds Tryton's `error`.
    /// Panics when the server cannot be reached.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        self.rpc_with_context(
            method,
            params,
            json!({"company": COMPANY, "language": "en"}),
        )
    }

    /// Like [`Tryton::rpc`] with another context (stock levels take `locations`).
    pub fn rpc_with_context(
        &self,
        method: &str,
        params: Value,
        context: Value,
    ) -> Result<Value, Value> {
        let mut params = match params {
            Value::Array(params) => params,
            other => vec![other],
        };
        params.push(context);
        let answer = self
            .post(method, Value::Array(params), true)
            .unwrap_or_else(|e| panic!("Tryton RPC failed: {e}"));
        match answer.get("error") {
            Some(error) if !error.is_null() => Err(error.clone()),
            _ => Ok(answer.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Like [`Tryton::rpc`], panicking on an error answer.
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.rpc(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    /// The id of the record of `model` whose `field` equals `value`.
    pub fn id_of(&self, model: &str, field: &str, value: &str) -> Option<i64> {
        let found = self.call(
            &format!("model.{model}.search"),
            json!([[[field, "=", value]], 0, 1, null]),
        );
        found.get(0).and_then(Value::as_i64)
    }

    /// The quantity of `sku` on hand (done moves) at the location with this code, its
    /// children included.
    pub fn stock_level(&self, sku: &str, location_code: &str) -> f64 {
        let product = self
            .id_of("product.product", "code", sku)
            .unwrap_or_else(|| panic!("no product {sku}"));
        let location = self
            .id_of("stock.location", "code", location_code)
            .unwrap_or_else(|| panic!("no location {location_code}"));
        let read = self
            .rpc_with_context(
                "model.product.product.read",
                json!([[product], ["quantity"]]),
                json!({"company": COMPANY, "language": "en", "locations": [location]}),
            )
            .unwrap_or_else(|e| panic!("reading the stock of {sku}: {e}"));
        read.get(0)
            .and_then(|r| r.get("quantity"))
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("no quantity for {sku}: {read}"))
    }

    /// The state of the first (oldest) record of a shipment model with this reference.
    pub fn shipment_state(&self, model: &str, reference: &str) -> Option<String> {
        let found = self.call(
            &format!("model.{model}.search_read"),
            json!([
                [["reference", "=", reference]],
                0,
                1,
                [["id", "ASC"]],
                ["state"]
            ]),
        );
        found
            .get(0)
            .and_then(|r| r.get("state"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// How many records of `model` match `domain`.
    pub fn count(&self, model: &str, domain: Value) -> u64 {
        let found = self.call(&format!("model.{model}.search_count"), json!([domain]));
        found
            .as_u64()
            .unwrap_or_else(|| panic!("search_count of {model} answered {found}"))
    }

    /// Creates a goods product (unit, cost price 20) with this code; returns its id.
    pub fn create_product(&self, code: &str) -> i64 {
        let unit = self
            .id_of("product.uom", "symbol", "u")
            .expect("the unit of measure \"u\"");
        let templates = self.call(
            "model.product.template.create",
            json!([[{
                "name": format!("Product {code}"),
                "type": "goods",
                "default_uom": unit,
                "list_price": {"__class__": "Decimal", "decimal": "25"},
                "products": [["create", [{
                    "suffix_code": code,
                    "cost_price": {"__class__": "Decimal", "decimal": "20"},
                }]]],
            }]]),
        );
        let template = templates
            .get(0)
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("creating {code} answered {templates}"));
        let products = self.call(
            "model.product.product.search",
            json!([[["template", "=", template]], 0, 1, null]),
        );
        products
            .get(0)
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("no product for template {template}"))
    }
}
