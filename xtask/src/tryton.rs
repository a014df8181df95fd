//! Installs the real Tryton ERP the tests run against: a Python virtual environment with
//! `trytond` and `trytond-stock` 8.0 (LTS) from PyPI, and a seeded template database that each
//! test copies (a company, a currency, parties, products SKU-001..SKU-010, the warehouse "WH"
//! and a bin "STO-A1" under its storage). Both live in the cargo target directory and are made
//! once: a marker file written after success makes the next run skip the work.
//!
//! Layout (the tests look for exactly this, see tests/src/tryton.rs):
//! - `<target>/tryton-venv/` with `.backhaul-ready` holding the requirements it was made with;
//! - `<target>/tryton-seed/backhaul.sqlite` with `.backhaul-seed` holding the seed's fingerprint.
//!
//! `<target>` is `$CARGO_TARGET_DIR` when set, else `<workspace>/target`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::{on_path, run, workspace_root};

/// What pip installs; 8.0 is Tryton's long-term-support series.
const REQUIREMENTS: [&str; 2] = ["trytond~=8.0.0", "trytond-stock~=8.0.0"];
/// The database name, its admin login's password, and the files the tests use.
pub const DATABASE: &str = "backhaul";
const ADMIN_PASSWORD: &str = "admin";
const VENV_MARKER: &str = ".backhaul-ready";
const SEED_MARKER: &str = ".backhaul-seed";

/// Master data every Tryton test starts from, created with Tryton's own Python API.
const SEED_SCRIPT: &str = r#"
import sys
from decimal import Decimal

from trytond import config

config.update_etc(sys.argv[1])

from trytond.pool import Pool  # noqa: E402
from trytond.transaction import Transaction  # noqa: E402

dbname = sys.argv[2]
Pool.start()
pool = Pool(dbname)
pool.init()

with Transaction().start(dbname, 0, context={}) as transaction:
    Currency = pool.get('currency.currency')
    Party = pool.get('party.party')
    Company = pool.get('company.company')
    User = pool.get('res.user')
    Template = pool.get('product.template')
    Location = pool.get('stock.location')
    ModelData = pool.get('ir.model.data')

    usd, = Currency.create([{
        'name': 'U.S. Dollar', 'code': 'USD', 'symbol': '$',
        'rounding': Decimal('0.01'), 'digits': 2}])
    company_party, = Party.create([{'name': 'Acme Logistics', 'code': 'ACME'}])
    company, = Company.create([{'party': company_party.id, 'currency': usd.id}])
    admin, = User.search([('login', '=', 'admin')])
    User.write([admin], {
        'companies': [('add', [company.id])], 'company': company.id})

    Party.create([
        {'name': 'Customer A', 'code': 'CUST-A', 'addresses': [('create', [{
            'street': '1 Market Street', 'postal_code': '10001',
            'city': 'Springfield'}])]},
        {'name': 'Supplier B', 'code': 'SUPP-B', 'addresses': [('create', [{
            'street': '2 Harbour Road', 'postal_code': '20002',
            'city': 'Shelbyville'}])]},
    ])

    unit = ModelData.get_id('product', 'uom_unit')
    with transaction.set_context(company=company.id):
        Template.create([{
            'name': f'Item {n:03d}',
            'type': 'goods',
            'default_uom': unit,
            'list_price': Decimal('25'),
            'products': [('create', [{
                'suffix_code': f'SKU-{n:03d}',
                'cost_price': Decimal('20')}])],
        } for n in range(1, 11)])

    storage = ModelData.get_id('stock', 'location_storage')
    Location.create([{
        'name': 'Aisle A1', 'code': 'STO-A1', 'type': 'storage',
        'parent': storage}])
    transaction.commit()
print('seeded the Tryton template database')
"#;

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace when relative),
/// else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Makes sure the Tryton virtual environment and the seeded template database exist; returns
/// the virtual environment's directory.
pub fn ensure_tryton() -> anyhow::Result<PathBuf> {
    let target = target_dir();
    std::fs::create_dir_all(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    let venv = ensure_venv(&target.join("tryton-venv"))?;
    ensure_seed(&venv, &target.join("tryton-seed"))?;
    Ok(venv)
}

fn ensure_venv(venv: &Path) -> anyhow::Result<PathBuf> {
    let wanted = REQUIREMENTS.join("\n");
    let marker = venv.join(VENV_MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|found| found == wanted)
        && venv.join("bin/trytond").is_file()
    {
        return Ok(venv.to_path_buf());
    }
    eprintln!(
        "xtask: installing Tryton 8.0 into {} (about 45 s, once)",
        venv.display()
    );
    if !venv.join("bin/python").is_file()
        && let Err(first) = make_venv(venv)
    {
        // Debian ships venv without ensurepip unless python3-venv is installed.
        if !on_path("apt-get") {
            return Err(first.context(
                "`python3 -m venv` failed: install Python's venv module (Debian: \
                 apt-get install python3-venv)",
            ));
        }
        eprintln!("xtask: `python3 -m venv` failed ({first:#}); installing python3-venv");
        let _ = run(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
        );
        run(
            "apt-get install python3-venv",
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "python3-venv",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context(
            "`python3 -m venv` failed and the Debian package python3-venv could not be \
             installed: install it with `sudo apt-get install python3-venv`",
        )?;
        make_venv(venv).context(
            "`python3 -m venv` still fails after installing python3-venv (on Debian, the \
             package for this Python's version may be named python3.X-venv)",
        )?;
    }
    run(
        "pip install trytond trytond-stock",
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(REQUIREMENTS),
    )
    .with_context(|| {
        format!(
            "pip could not install {} into {} from PyPI (is PyPI reachable? delete that \
             directory to start over)",
            REQUIREMENTS.join(" "),
            venv.display()
        )
    })?;
    if !venv.join("bin/trytond").is_file() {
        bail!(
            "pip ran but {} is missing",
            venv.join("bin/trytond").display()
        );
    }
    std::fs::write(&marker, wanted)
        .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(venv.to_path_buf())
}

fn make_venv(venv: &Path) -> anyhow::Result<()> {
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .with_context(|| format!("cannot remove the half-made {}", venv.display()))?;
    }
    let result = run(
        "python3 -m venv",
        Command::new("python3").arg("-m").arg("venv").arg(venv),
    );
    if result.is_err() && venv.exists() {
        let _ = std::fs::remove_dir_all(venv);
    }
    result.context("python3 -m venv failed (is python3 installed? Debian: python3-venv)")
}

/// A fingerprint of what the seed is made from, so a changed seed is made again.
fn seed_fingerprint() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in SEED_SCRIPT.bytes().chain(REQUIREMENTS.join(" ").bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn ensure_seed(venv: &Path, seed_dir: &Path) -> anyhow::Result<()> {
    let fingerprint = seed_fingerprint();
    let database = seed_dir.join(format!("{DATABASE}.sqlite"));
    let marker = seed_dir.join(SEED_MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|found| found == fingerprint)
        && database.is_file()
    {
        return Ok(());
    }
    eprintln!(
        "xtask: making the seeded Tryton database {} (about 20 s, once)",
        database.display()
    );
    let build = seed_dir.join("build");
    if build.exists() {
        std::fs::remove_dir_all(&build)
            .with_context(|| format!("cannot remove {}", build.display()))?;
    }
    std::fs::create_dir_all(&build)
        .with_context(|| format!("cannot create {}", build.display()))?;
    let config = build.join("trytond.conf");
    std::fs::write(
        &config,
        format!("[database]\nuri = sqlite://\npath = {}\n", build.display()),
    )?;
    let password_file = build.join("admin-password");
    std::fs::write(&password_file, ADMIN_PASSWORD)?;
    let script = build.join("seed.py");
    std::fs::write(&script, SEED_SCRIPT)?;
    // trytond's SQLite backend opens an existing file only.
    std::fs::File::create(build.join(format!("{DATABASE}.sqlite")))?;
    run(
        "trytond-admin (create the database, activate stock)",
        Command::new(venv.join("bin/trytond-admin"))
            .arg("-c")
            .arg(&config)
            .args(["-d", DATABASE, "-u", "stock", "--activate-dependencies"])
            .args(["--email", "admin@example.com"])
            .env("TRYTONPASSFILE", &password_file),
    )?;
    run(
        "seed the Tryton database",
        Command::new(venv.join("bin/python"))
            .arg(&script)
            .arg(&config)
            .arg(DATABASE),
    )?;
    std::fs::rename(build.join(format!("{DATABASE}.sqlite")), &database)
        .with_context(|| format!("cannot move the seeded database to {}", database.display()))?;
    std::fs::write(&marker, fingerprint)
        .with_context(|| format!("cannot write {}", marker.display()))?;
    let _ = std::fs::remove_dir_all(&build);
    Ok(())
}
