//! The Debian packages. `xtask package --bin-dir` packs the binaries this test run already has
//! (no release build, no cargo-deb); each .deb, unpacked into a scratch root with
//! `dpkg-deb -x`, holds what an installation needs, and the maintainer scripts, run against
//! stand-in commands that record their arguments, enable the service but never start it.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backhaul_tests::binary;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (Debian's dpkg is needed): {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every regular file under `root`, relative to it.
fn files(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

struct Expected {
    package: &'static str,
    /// The short name used in the snippets and the config.
    service: &'static str,
    binaries: &'static [&'static str],
    extra: &'static [&'static str],
}

const PACKAGES: [Expected; 2] = [
    Expected {
        package: "backhaul-agent",
        service: "agent",
        binaries: &["backhaul-agent", "backhaul-sim"],
        extra: &[],
    },
    Expected {
        package: "backhaul-relay",
        service: "relay",
        binaries: &["backhaul-relay"],
        extra: &[
            "usr/share/backhaul/grafana/backhaul.json",
            "usr/share/backhaul/prometheus/alerts.yml",
            "usr/share/backhaul/mosquitto/backhaul.conf",
            "usr/share/backhaul/mosquitto/backhaul.acl",
        ],
    },
];

#[test]
fn packages_hold_what_an_installation_needs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let bin_dir = binary("backhaul-agent").parent().unwrap().to_path_buf();
    // Uncompressed: the debug binaries are large and xz would take most of the test's time.
    let built = run(
        &binary("xtask").to_string_lossy(),
        &[
            "package",
            "--bin-dir",
            &bin_dir.to_string_lossy(),
            "--out",
            &out.to_string_lossy(),
            "--compression",
            "none",
        ],
    );
    assert!(built.status.success(), "xtask package:\n{}", text(&built));
    let arch = String::from_utf8_lossy(&run("dpkg", &["--print-architecture"]).stdout)
        .trim()
        .to_string();
    let printed = String::from_utf8_lossy(&built.stdout).into_owned();

    let mut owners: Vec<(&str, BTreeSet<PathBuf>)> = Vec::new();
    for expected in &PACKAGES {
        let name = expected.package;
        let deb = out.join(format!("{name}_{VERSION}-1_{arch}.deb"));
        assert!(
            printed.lines().any(|l| Path::new(l) == deb),
            "xtask package did not print {}:\n{printed}",
            deb.display()
        );
        let deb_str = deb.to_string_lossy().into_owned();

        // The control fields.
        let field = |field: &str| {
            let output = run("dpkg-deb", &["-f", &deb_str, field]);
            assert!(
                output.status.success(),
                "dpkg-deb -f {field}: {}",
                text(&output)
            );
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        };
        assert_eq!(field("Package"), name);
        assert_eq!(field("Version"), format!("{VERSION}-1"));
        assert_eq!(field("Architecture"), arch);
        assert!(field("Maintainer").contains('@'), "{name}: Maintainer");
        let depends = field("Depends");
        assert!(
            depends.split(", ").any(|d| d.starts_with("libc6")),
            "{name}: Depends: {depends}"
        );
        assert!(
            field("Description").lines().count() > 2,
            "{name}: Description"
        );

        // The files, unpacked as dpkg would install them.
        let root = dir.path().join(name);
        let control = dir.path().join(format!("{name}.DEBIAN"));
        for (flag, target) in [("-x", &root), ("-e", &control)] {
            let output = run("dpkg-deb", &[flag, &deb_str, &target.to_string_lossy()]);
            assert!(
                output.status.success(),
                "dpkg-deb {flag}: {}",
                text(&output)
            );
        }
        let installed = files(&root);

        for bin in expected.binaries {
            let path = root.join("usr/bin").join(bin);
            let mode = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{name}: /usr/bin/{bin}: {e}"))
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755, "{name}: /usr/bin/{bin} mode {mode:o}");
            let version = run(&path.to_string_lossy(), &["--version"]);
            assert!(
                version.status.success() && text(&version).contains(VERSION),
                "{bin} --version: {}",
                text(&version)
            );
        }

        let service = expected.service;
        let unit = format!("lib/systemd/system/backhaul-{service}.service");
        let same_as = [
            (unit.clone(), format!("systemd/backhaul-{service}.service")),
            (
                format!("usr/lib/sysusers.d/backhaul-{service}.conf"),
                "systemd/backhaul.sysusers.conf".to_string(),
            ),
            (
                format!("usr/lib/tmpfiles.d/backhaul-{service}.conf"),
                "systemd/backhaul.tmpfiles.conf".to_string(),
            ),
            (
                format!("etc/backhaul/{service}.toml.example"),
                format!("config/{service}.toml"),
            ),
            (
                format!("usr/share/doc/{name}/README.md"),
                "README.md".into(),
            ),
            (
                "DEBIAN/postinst".into(),
                format!("debian/{service}/postinst"),
            ),
            ("DEBIAN/prerm".into(), format!("debian/{service}/prerm")),
            ("DEBIAN/postrm".into(), format!("debian/{service}/postrm")),
        ];
        for (packaged, source) in &same_as {
            let packaged = match packaged.strip_prefix("DEBIAN/") {
                Some(script) => control.join(script),
                None => root.join(packaged),
            };
            assert_eq!(
                read(&packaged),
                read(&workspace(source)),
                "{name}: {} differs from {source}",
                packaged.display()
            );
        }
        for script in ["postinst", "prerm", "postrm"] {
            let mode = std::fs::metadata(control.join(script))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755, "{name}: DEBIAN/{script} mode {mode:o}");
        }
        assert!(
            installed.contains(Path::new(&format!("usr/share/doc/{name}/copyright"))),
            "{name}: no copyright file"
        );
        for extra in expected.extra {
            assert!(installed.contains(Path::new(extra)), "{name}: no /{extra}");
        }
        if name == "backhaul-relay" {
            let dashboard = read(&root.join("usr/share/backhaul/grafana/backhaul.json"));
            serde_json::from_str::<serde_json::Value>(&dashboard).expect("dashboard JSON");
        }

        // What the unit runs is in the package.
        for line in read(&root.join(&unit)).lines() {
            if let Some(command) = line
                .strip_prefix("ExecStart=")
                .or_else(|| line.strip_prefix("ExecStartPre="))
            {
                let program = command.split_whitespace().next().unwrap_or_default();
                assert!(
                    root.join(program.trim_start_matches('/')).is_file(),
                    "{name}: the unit runs {program}, which the package lacks"
                );
            }
        }

        // Everything under /etc is a conffile, and the packaged config passes check-config
        // with the packaged binary.
        let conffiles: BTreeSet<String> = read(&control.join("conffiles"))
            .lines()
            .map(str::to_string)
            .collect();
        let in_etc: BTreeSet<String> = installed
            .iter()
            .filter(|f| f.starts_with("etc"))
            .map(|f| format!("/{}", f.display()))
            .collect();
        assert_eq!(
            conffiles, in_etc,
            "{name}: conffiles against the files in /etc"
        );
        assert!(conffiles.contains(&format!("/etc/backhaul/{service}.toml.example")));
        let config = root.join(format!("etc/backhaul/{service}.toml.example"));
        let check = run(
            &root.join(format!("usr/bin/{name}")).to_string_lossy(),
            &["check-config", "--config", &config.to_string_lossy()],
        );
        assert!(
            check.status.success(),
            "{name} check-config: {}",
            text(&check)
        );

        // md5sums covers the files and they match.
        let md5sums = control.join("md5sums");
        let verified = Command::new("md5sum")
            .args(["--check", "--quiet", &md5sums.to_string_lossy()])
            .current_dir(&root)
            .output()
            .expect("md5sum");
        assert!(verified.status.success(), "{name}: {}", text(&verified));
        assert_eq!(
            read(&md5sums).lines().count() + conffiles.len(),
            installed.len(),
            "{name}: md5sums lists every file but the conffiles"
        );

        owners.push((name, installed));
    }

    // dpkg refuses to install two packages that ship the same file; both may go on one
    // machine (a single-server setup).
    let shared: Vec<_> = owners[0].1.intersection(&owners[1].1).collect();
    assert!(
        shared.is_empty(),
        "both packages ship {shared:?}: they could not be installed together"
    );
}

/// A directory of stand-ins for every command the scripts may call; each appends its name and
/// arguments to the log. `getent` finds nothing, `deb-systemd-helper was-enabled` says yes.
struct Stubs {
    dir: tempfile::TempDir,
    log: PathBuf,
    /// The path that stands for /run/systemd/system.
    systemd_running: PathBuf,
    /// The directory that stands for /usr/lib/tmpfiles.d.
    tmpfiles: PathBuf,
}

const COMMANDS: [&str; 14] = [
    "systemd-sysusers",
    "systemd-tmpfiles",
    "deb-systemd-helper",
    "deb-systemd-invoke",
    "systemctl",
    "adduser",
    "useradd",
    "groupadd",
    "getent",
    "mkdir",
    "chown",
    "chmod",
    "rm",
    "rmdir",
];

impl Stubs {
    /// Stand-ins for `commands` only: a command left out is missing, as on a system without it.
    fn new(commands: &[&str]) -> Stubs {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.log");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for command in commands {
            let status = if *command == "getent" { 2 } else { 0 };
            let path = bin.join(command);
            std::fs::write(
                &path,
                format!("#!/bin/sh\necho \"{command} $*\" >> \"$STUB_LOG\"\nexit {status}\n"),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let systemd_running = dir.path().join("run-systemd-system");
        let tmpfiles = dir.path().join("tmpfiles.d");
        std::fs::create_dir(&tmpfiles).unwrap();
        Stubs {
            dir,
            log,
            systemd_running,
            tmpfiles,
        }
    }

    /// Runs a maintainer script with only the stand-ins on PATH; returns the calls it made.
    fn run(&self, script: &Path, args: &[&str], systemd_running: bool) -> Vec<String> {
        if systemd_running {
            std::fs::create_dir_all(&self.systemd_running).unwrap();
        } else {
            let _ = std::fs::remove_dir(&self.systemd_running);
        }
        let body = read(script)
            .replace(
                "/run/systemd/system",
                &self.systemd_running.to_string_lossy(),
            )
            .replace("/usr/lib/tmpfiles.d", &self.tmpfiles.to_string_lossy());
        let _ = std::fs::remove_file(&self.log);
        let output = Command::new("/bin/sh")
            .arg("-c")
            .arg(&body)
            .arg(script.file_name().unwrap())
            .args(args)
            .env_clear()
            .env("PATH", self.dir.path().join("bin"))
            .env("STUB_LOG", &self.log)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{} {args:?} failed: {}",
            script.display(),
            text(&output)
        );
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Whether a recorded call starts (or restarts from stopped) a unit.
fn starts(call: &str) -> bool {
    let words: Vec<&str> = call.split_whitespace().collect();
    matches!(
        words.first(),
        Some(&"systemctl") | Some(&"deb-systemd-invoke")
    ) && words
        .iter()
        .any(|w| matches!(*w, "start" | "restart" | "reload-or-restart" | "--now"))
}

#[test]
fn maintainer_scripts_enable_but_never_start() {
    for service in ["agent", "relay"] {
        let unit = format!("backhaul-{service}.service");
        let snippet = format!("backhaul-{service}.conf");
        let script = |name: &str| workspace(&format!("debian/{service}/{name}"));
        let postinst = script("postinst");
        let all = Stubs::new(&COMMANDS);

        // First installation, twice (dpkg may run it again after a failure): the same calls,
        // the user and directories from the snippets, the unit enabled, nothing started.
        for systemd_running in [true, false] {
            let first = all.run(&postinst, &["configure", ""], systemd_running);
            let again = all.run(&postinst, &["configure", ""], systemd_running);
            assert_eq!(first, again, "{service}: postinst is not repeatable");
            for wanted in [
                format!("systemd-sysusers {snippet}"),
                format!("systemd-tmpfiles --create {snippet}"),
                format!("deb-systemd-helper enable {unit}"),
            ] {
                assert!(
                    first.contains(&wanted),
                    "{service}: no `{wanted}` in {first:?}"
                );
            }
            assert!(
                !first.iter().any(|c| starts(c) || c.contains("try-restart")),
                "{service}: postinst starts the service: {first:?}"
            );
            assert_eq!(
                first.contains(&"systemctl --system daemon-reload".to_string()),
                systemd_running,
                "{service}: daemon-reload only with a running systemd: {first:?}"
            );
        }

        // An upgrade moves a running service to the new binary and starts no stopped one.
        let upgrade = all.run(&postinst, &["configure", "0.0.1-1"], true);
        assert!(
            upgrade.contains(&format!("systemctl try-restart {unit}")),
            "{service}: {upgrade:?}"
        );
        assert!(!upgrade.iter().any(|c| starts(c)), "{service}: {upgrade:?}");

        // Without systemd's tools: adduser, the directories by hand, systemctl enable.
        let bare = Stubs::new(&["systemctl", "adduser", "getent", "mkdir", "chown", "chmod"]);
        let calls = bare.run(&postinst, &["configure", ""], false);
        for wanted in [
            "adduser --system --group --home /var/lib/backhaul-agent --no-create-home \
             --shell /usr/sbin/nologin backhaul"
                .to_string(),
            "mkdir -p /etc/backhaul".into(),
            "chown root:backhaul /etc/backhaul/credentials".into(),
            "chmod 0750 /etc/backhaul".into(),
            format!("systemctl enable {unit}"),
        ] {
            assert!(
                calls.contains(&wanted),
                "{service}: no `{wanted}` in {calls:?}"
            );
        }
        assert!(!calls.iter().any(|c| starts(c)), "{service}: {calls:?}");
        // Neither adduser nor sysusers: useradd, which every Debian system has.
        let minimal = Stubs::new(&["getent", "groupadd", "useradd", "mkdir", "chown", "chmod"]);
        let calls = minimal.run(&postinst, &["configure", ""], false);
        assert!(
            calls.iter().any(|c| c.starts_with("useradd --system")),
            "{service}: {calls:?}"
        );

        // prerm stops the service on removal only, never on an upgrade.
        let prerm = script("prerm");
        let removal = all.run(&prerm, &["remove"], true);
        assert_eq!(
            removal,
            [format!("deb-systemd-invoke stop {unit}")],
            "{service}"
        );
        let upgrade = all.run(&prerm, &["upgrade", "0.2.0-1"], true);
        assert!(upgrade.is_empty(), "{service}: prerm upgrade: {upgrade:?}");

        // postrm: removal masks, purge forgets the unit and deletes the state.
        let postrm = script("postrm");
        let removal = all.run(&postrm, &["remove"], false);
        assert_eq!(
            removal,
            [format!("deb-systemd-helper mask {unit}")],
            "{service}"
        );
        let purge = all.run(&postrm, &["purge"], false);
        for wanted in [
            format!("deb-systemd-helper purge {unit}"),
            format!("rm -rf /var/lib/backhaul-{service}"),
            "rmdir /etc/backhaul".into(),
        ] {
            assert!(
                purge.contains(&wanted),
                "{service}: no `{wanted}` in {purge:?}"
            );
        }
        assert_eq!(
            purge,
            all.run(&postrm, &["purge"], false),
            "{service}: postrm purge is not repeatable"
        );
        // /etc/backhaul stays while the other package is installed.
        let other = if service == "agent" { "relay" } else { "agent" };
        let other_snippet = all.tmpfiles.join(format!("backhaul-{other}.conf"));
        std::fs::write(&other_snippet, "").unwrap();
        let purge = all.run(&postrm, &["purge"], false);
        assert!(
            !purge.iter().any(|c| c.starts_with("rmdir")),
            "{service}: {purge:?}"
        );
        std::fs::remove_file(&other_snippet).unwrap();
        let upgrade = all.run(&postrm, &["upgrade", "0.2.0-1"], false);
        assert!(upgrade.is_empty(), "{service}: postrm upgrade: {upgrade:?}");

        // POSIX sh: dash, Debian's /bin/sh, parses them.
        for name in ["postinst", "prerm", "postrm"] {
            let path = script(name);
            assert!(read(&path).starts_with("#!/bin/sh\n"), "{}", path.display());
            assert!(read(&path).contains("\nset -e\n"), "{}", path.display());
            if Path::new("/bin/dash").exists() {
                let parsed = run("/bin/dash", &["-n", &path.to_string_lossy()]);
                assert!(parsed.status.success(), "{}", text(&parsed));
            }
        }
    }
}
