//! `cargo xtask package`: the Debian packages of both services, built with nothing but the Rust
//! toolchain and `dpkg-deb`.
//!
//! What goes into each package is read from the `[package.metadata.deb]` table of its
//! Cargo.toml — the table cargo-deb reads — so `cargo deb` and this command build the same
//! package: the assets (cargo-deb's `target/release/` prefix meaning the directory of the
//! binaries packaged), the conffiles, the maintainer scripts (complete scripts; `#DEBHELPER#`
//! is not expanded here), and `depends`, where `$auto` becomes the libraries the binaries link
//! (read from their ELF headers) with the newest glibc symbol version they need.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

/// The packages built, by Cargo package name (which is also the Debian package name).
const PACKAGES: [&str; 2] = ["backhaul-agent", "backhaul-relay"];

/// Maintainer scripts dpkg knows, with their modes.
const CONTROL_SCRIPTS: [(&str, u32); 5] = [
    ("preinst", 0o755),
    ("postinst", 0o755),
    ("prerm", 0o755),
    ("postrm", 0o755),
    ("triggers", 0o644),
];

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Cargo profile of the binaries: release, debug (target/debug), or a custom profile.
    #[arg(long, default_value = "release")]
    profile: String,
    /// Package the binaries already in this directory, without building them.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where the package trees and the .deb files go [default: target/package].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Compression of the .deb (dpkg-deb -Z): xz, zstd, gzip or none [default: dpkg-deb's].
    #[arg(long, value_name = "TYPE")]
    compression: Option<String>,
    /// Keep the binaries' debug information (by default `strip --strip-unneeded` removes it,
    /// as cargo-deb does).
    #[arg(long)]
    no_strip: bool,
}

/// Builds the packages and prints the path of each .deb file.
pub fn run(root: &Path, args: PackageArgs) -> anyhow::Result<()> {
    for deb in build(root, &args)? {
        println!("{}", deb.display());
    }
    Ok(())
}

fn build(root: &Path, args: &PackageArgs) -> anyhow::Result<Vec<PathBuf>> {
    let arch = debian_architecture()?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let out = match &args.out {
        Some(out) => cwd.join(out),
        None => crate::tryton::target_dir().join("package"),
    };
    let bin_dir = match &args.bin_dir {
        Some(dir) => cwd.join(dir),
        None => build_binaries(&args.profile)?,
    };
    let metadata = cargo_metadata()?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut debs = Vec::new();
    for name in PACKAGES {
        let package = Package::from_metadata(&metadata, name, root)?;
        let tree = out.join(name);
        stage(&package, &bin_dir, &arch, &tree, !args.no_strip)
            .with_context(|| format!("cannot assemble the package tree of {name}"))?;
        let deb = out.join(format!("{name}_{}_{arch}.deb", package.version));
        dpkg_deb_build(&tree, &deb, args.compression.as_deref())?;
        debs.push(deb);
    }
    Ok(debs)
}

fn debian_architecture() -> anyhow::Result<String> {
    let output = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context(
            "cannot run `dpkg --print-architecture`: building .deb files needs dpkg \
             (Debian or Ubuntu)",
        )?;
    let arch = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || arch.is_empty() {
        bail!(
            "dpkg --print-architecture failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(arch)
}

/// Builds the binaries of both packages with the profile; returns the directory they are in.
fn build_binaries(profile: &str) -> anyhow::Result<PathBuf> {
    let (cargo_profile, dir) = match profile {
        "release" => ("release", "release"),
        "debug" | "dev" => ("dev", "debug"),
        other => (other, other),
    };
    let mut build = crate::cargo();
    build.args(["build", "--profile", cargo_profile, "--bins"]);
    for name in PACKAGES {
        build.args(["--package", name]);
    }
    crate::run(
        &format!("cargo build --profile {cargo_profile}"),
        &mut build,
    )?;
    Ok(crate::tryton::target_dir().join(dir))
}

fn cargo_metadata() -> anyhow::Result<Value> {
    let output = crate::cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")
}

/// One package, as its `[package.metadata.deb]` table describes it.
struct Package {
    name: String,
    /// Debian version: the Cargo version and the revision.
    version: String,
    summary: String,
    extended_description: String,
    maintainer: String,
    section: String,
    priority: String,
    homepage: Option<String>,
    license: Option<String>,
    copyright: String,
    depends: Vec<String>,
    assets: Vec<Asset>,
    conf_files: Vec<String>,
    maintainer_scripts: Option<PathBuf>,
}

struct Asset {
    source: AssetSource,
    /// The path in the package, relative to `/`.
    target: PathBuf,
    mode: u32,
}

enum AssetSource {
    File(PathBuf),
    /// A file name in the directory of the binaries packaged.
    Binary(String),
}

impl Package {
    fn from_metadata(metadata: &Value, name: &str, root: &Path) -> anyhow::Result<Package> {
        let cargo = metadata["packages"]
            .as_array()
            .and_then(|packages| packages.iter().find(|p| p["name"] == name))
            .with_context(|| format!("cargo metadata lists no package {name}"))?;
        let manifest = cargo["manifest_path"]
            .as_str()
            .map(PathBuf::from)
            .with_context(|| format!("{name}: no manifest_path in cargo metadata"))?;
        let package_dir = manifest.parent().unwrap_or(root).to_path_buf();
        let deb = &cargo["metadata"]["deb"];
        if !deb.is_object() {
            bail!(
                "{}: no [package.metadata.deb] table",
                manifest.strip_prefix(root).unwrap_or(&manifest).display()
            );
        }
        let context = || format!("{name}: [package.metadata.deb]");
        let text = |key: &str| -> Option<String> { deb[key].as_str().map(str::to_string) };
        let required = |key: &str| -> anyhow::Result<String> {
            text(key).with_context(|| format!("{}: `{key}` is missing", context()))
        };
        let cargo_version = cargo["version"]
            .as_str()
            .with_context(|| format!("{name}: no version in cargo metadata"))?;
        let version = match text("revision").filter(|r| !r.is_empty()) {
            Some(revision) => format!("{cargo_version}-{revision}"),
            None => cargo_version.to_string(),
        };

        let mut assets = Vec::new();
        for (i, raw) in deb["assets"]
            .as_array()
            .with_context(|| format!("{}: `assets` is missing", context()))?
            .iter()
            .enumerate()
        {
            assets.push(
                Asset::parse(raw, &package_dir)
                    .with_context(|| format!("{}: asset {}: {raw}", context(), i + 1))?,
            );
        }
        // cargo-deb makes every file under /etc a conffile; `conf-files` may name more.
        let mut conf_files: BTreeSet<String> = assets
            .iter()
            .filter(|a| a.target.starts_with("etc"))
            .map(|a| format!("/{}", a.target.display()))
            .collect();
        if let Some(listed) = deb["conf-files"].as_array() {
            for file in listed {
                let file = file
                    .as_str()
                    .with_context(|| format!("{}: conf-files: {file} is no path", context()))?;
                conf_files.insert(format!("/{}", file.trim_start_matches('/')));
            }
        }
        let depends = text("depends")
            .unwrap_or_else(|| "$auto".into())
            .split(',')
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty())
            .collect();

        Ok(Package {
            name: name.to_string(),
            version,
            summary: cargo["description"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| fallback_summary(name)),
            extended_description: text("extended-description").unwrap_or_default(),
            maintainer: required("maintainer")?,
            section: text("section").unwrap_or_else(|| "misc".into()),
            priority: text("priority").unwrap_or_else(|| "optional".into()),
            homepage: ["homepage", "documentation", "repository"]
                .iter()
                .find_map(|key| cargo[*key].as_str().map(str::to_string)),
            license: cargo["license"].as_str().map(str::to_string),
            copyright: required("copyright")?,
            depends,
            assets,
            conf_files: conf_files.into_iter().collect(),
            maintainer_scripts: text("maintainer-scripts").map(|dir| package_dir.join(dir)),
        })
    }
}

/// The summary line when Cargo.toml has no `description` (cargo-deb then writes a placeholder).
fn fallback_summary(name: &str) -> String {
    match name {
        "backhaul-agent" => "Backhaul site agent: durable store-and-forward of warehouse events",
        "backhaul-relay" => "Backhaul cloud relay: outbox, ERP delivery and dead-letter queue",
        _ => "Backhaul",
    }
    .to_string()
}

impl Asset {
    /// `[source, target, mode]` as cargo-deb takes it: a target ending in `/` is a directory,
    /// a source under `target/release/` is a built binary.
    fn parse(raw: &Value, package_dir: &Path) -> anyhow::Result<Asset> {
        let [source, target, mode] = raw
            .as_array()
            .and_then(|a| <&[Value; 3]>::try_from(a.as_slice()).ok())
            .and_then(|[s, t, m]| Some([s.as_str()?, t.as_str()?, m.as_str()?]))
            .context("expected [\"source\", \"target\", \"mode\"]")?;
        if source.contains(['*', '?', '[']) {
            bail!("globs are not supported by cargo xtask package");
        }
        let mode = u32::from_str_radix(mode, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .with_context(|| format!("mode {mode:?} is not an octal file mode"))?;
        let source = match source.strip_prefix("target/release/") {
            Some(binary) => AssetSource::Binary(binary.to_string()),
            None => AssetSource::File(package_dir.join(source)),
        };
        let file_name = match &source {
            AssetSource::Binary(name) => Path::new(name).file_name(),
            AssetSource::File(path) => path.file_name(),
        }
        .context("the source names no file")?;
        let relative = target.trim_start_matches('/');
        let target = if target.ends_with('/') {
            Path::new(relative).join(file_name)
        } else {
            PathBuf::from(relative)
        };
        if target.as_os_str().is_empty()
            || target
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("target {target:?} is not a plain absolute path");
        }
        Ok(Asset {
            source,
            target,
            mode,
        })
    }
}

/// Assembles the package tree: the assets, the copyright file, and DEBIAN/.
fn stage(
    package: &Package,
    bin_dir: &Path,
    arch: &str,
    tree: &Path,
    strip: bool,
) -> anyhow::Result<()> {
    if tree.exists() {
        std::fs::remove_dir_all(tree)
            .with_context(|| format!("cannot remove the old tree {}", tree.display()))?;
    }
    make_dir(tree, tree)?;
    let mut binaries = Vec::new();
    for asset in &package.assets {
        let source = match &asset.source {
            AssetSource::File(path) => path.clone(),
            AssetSource::Binary(name) => {
                let path = bin_dir.join(name);
                binaries.push(path.clone());
                path
            }
        };
        let target = tree.join(&asset.target);
        make_dir(tree, target.parent().unwrap_or(tree))?;
        std::fs::copy(&source, &target).with_context(|| {
            format!(
                "cannot copy {} to {}",
                source.display(),
                asset.target.display()
            )
        })?;
        if strip && matches!(asset.source, AssetSource::Binary(_)) {
            strip_binary(&target)?;
        }
        set_mode(&target, asset.mode)?;
    }

    let doc = tree.join("usr/share/doc").join(&package.name);
    make_dir(tree, &doc)?;
    write_file(&doc.join("copyright"), &copyright(package), 0o644)?;

    for conf_file in &package.conf_files {
        if !tree.join(conf_file.trim_start_matches('/')).is_file() {
            bail!("conffile {conf_file} is not among the assets");
        }
    }

    let debian = tree.join("DEBIAN");
    make_dir(tree, &debian)?;
    if let Some(dir) = &package.maintainer_scripts {
        for (script, mode) in CONTROL_SCRIPTS {
            let source = dir.join(script);
            if !source.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&source)
                .with_context(|| format!("cannot read {}", source.display()))?;
            if text.contains("#DEBHELPER#") {
                bail!(
                    "{}: #DEBHELPER# is not expanded by cargo xtask package; write the \
                     complete script",
                    source.display()
                );
            }
            write_file(&debian.join(script), &text, mode)?;
        }
    }
    if !package.conf_files.is_empty() {
        let list: String = package
            .conf_files
            .iter()
            .map(|f| format!("{f}\n"))
            .collect();
        write_file(&debian.join("conffiles"), &list, 0o644)?;
    }
    write_md5sums(tree, &package.conf_files)?;

    let depends = resolve_depends(&package.depends, &binaries)?;
    let installed_size = installed_size_kib(tree)?;
    write_file(
        &debian.join("control"),
        &control(package, arch, &depends, installed_size),
        0o644,
    )
}

/// Removes debug information and symbols not needed for relocation. A system without binutils
/// gets the binary as it is, with a warning.
fn strip_binary(path: &Path) -> anyhow::Result<()> {
    match Command::new("strip")
        .arg("--strip-unneeded")
        .arg(path)
        .output()
    {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => bail!(
            "strip {} failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => {
            eprintln!(
                "xtask: {} keeps its debug information, strip cannot run: {e}",
                path.display()
            );
            Ok(())
        }
    }
}

fn control(package: &Package, arch: &str, depends: &[String], installed_size: u64) -> String {
    let mut control = String::new();
    let mut field = |name: &str, value: &str| {
        let _ = writeln!(control, "{name}: {value}");
    };
    field("Package", &package.name);
    field("Version", &package.version);
    field("Architecture", arch);
    field("Maintainer", &package.maintainer);
    field("Installed-Size", &installed_size.to_string());
    if !depends.is_empty() {
        field("Depends", &depends.join(", "));
    }
    field("Section", &package.section);
    field("Priority", &package.priority);
    if let Some(homepage) = &package.homepage {
        field("Homepage", homepage);
    }
    field("Description", &package.summary);
    control.push_str(&extended_description(&package.extended_description));
    control
}

/// The extended description in control-file form: lines indented by one space, wrapped at 80
/// columns, an empty line written as ` .`.
fn extended_description(text: &str) -> String {
    let mut out = String::new();
    for line in text.trim_end().lines() {
        if line.trim().is_empty() {
            out.push_str(" .\n");
            continue;
        }
        let mut current = String::new();
        for word in line.split_whitespace() {
            if !current.is_empty() && current.len() + 1 + word.len() > 79 {
                let _ = writeln!(out, " {current}");
                current.clear();
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
        let _ = writeln!(out, " {current}");
    }
    out
}

fn copyright(package: &Package) -> String {
    let license = package.license.as_deref().unwrap_or("unknown");
    let mut text = format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: {}\n",
        package.name
    );
    if let Some(homepage) = &package.homepage {
        let _ = writeln!(text, "Source: {homepage}");
    }
    let _ = write!(
        text,
        "\nFiles: *\nCopyright: {}\nLicense: {license}\n",
        package.copyright
    );
    if license == "Apache-2.0" {
        text.push_str(
            " On Debian systems, the complete text of the Apache License 2.0 is in\n \
             /usr/share/common-licenses/Apache-2.0.\n",
        );
    }
    text
}

/// `$auto` becomes the packages of the shared libraries the binaries link, libc6 with the
/// newest glibc symbol version they use.
fn resolve_depends(depends: &[String], binaries: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut resolved = Vec::new();
    for depend in depends {
        if depend != "$auto" {
            resolved.push(depend.clone());
            continue;
        }
        let mut needed = BTreeSet::new();
        let mut glibc: Option<Vec<u32>> = None;
        for binary in binaries {
            let bytes = std::fs::read(binary)
                .with_context(|| format!("cannot read {}", binary.display()))?;
            let elf = elf::Dynamic::read(&bytes)
                .with_context(|| format!("{}: cannot read its ELF headers", binary.display()))?;
            needed.extend(elf.needed);
            for version in elf.versions {
                let numbers = version.strip_prefix("GLIBC_").and_then(|v| {
                    v.split('.')
                        .map(|n| n.parse().ok())
                        .collect::<Option<Vec<u32>>>()
                });
                if numbers > glibc {
                    glibc = numbers;
                }
            }
        }
        let mut packages = BTreeSet::new();
        for library in &needed {
            let package = match library.as_str() {
                "libc.so.6" | "libm.so.6" | "libpthread.so.0" | "libdl.so.2" | "librt.so.1"
                | "libutil.so.1" => match &glibc {
                    Some(version) => {
                        let version: Vec<String> =
                            version.iter().map(ToString::to_string).collect();
                        format!("libc6 (>= {})", version.join("."))
                    }
                    None => "libc6".to_string(),
                },
                "libgcc_s.so.1" => "libgcc-s1".to_string(),
                library if library.starts_with("ld-linux") => continue,
                other => bail!(
                    "the binaries link {other}, which `$auto` cannot map to a Debian \
                     package: name the package in `depends`"
                ),
            };
            packages.insert(package);
        }
        resolved.extend(packages);
    }
    Ok(resolved)
}

/// DEBIAN/md5sums over every file but the conffiles (dpkg checks those by itself). Skipped
/// with a warning when `md5sum` cannot run; the file is optional.
fn write_md5sums(tree: &Path, conf_files: &[String]) -> anyhow::Result<()> {
    let mut files = Vec::new();
    collect_files(tree, tree, &mut files)?;
    files.retain(|f| {
        !f.starts_with("DEBIAN")
            && !conf_files
                .iter()
                .any(|c| Path::new(c.trim_start_matches('/')) == f)
    });
    files.sort();
    if files.is_empty() {
        return Ok(());
    }
    match Command::new("md5sum")
        .arg("--")
        .args(&files)
        .current_dir(tree)
        .output()
    {
        Ok(output) if output.status.success() => write_file(
            &tree.join("DEBIAN/md5sums"),
            &String::from_utf8_lossy(&output.stdout),
            0o644,
        ),
        Ok(output) => bail!(
            "md5sum failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => {
            eprintln!("xtask: no DEBIAN/md5sums, md5sum cannot run: {e}");
            Ok(())
        }
    }
}

fn collect_files(tree: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_files(tree, &path, files)?;
        } else if let Ok(relative) = path.strip_prefix(tree) {
            files.push(relative.to_path_buf());
        }
    }
    Ok(())
}

/// Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, and 1 per directory.
fn installed_size_kib(tree: &Path) -> anyhow::Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> anyhow::Result<()> {
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            if entry.file_name() == "DEBIAN" {
                continue;
            }
            let meta = entry
                .metadata()
                .with_context(|| format!("cannot stat {}", entry.path().display()))?;
            if meta.is_dir() {
                *total += 1;
                walk(&entry.path(), total)?;
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(tree, &mut total)?;
    Ok(total)
}

/// Creates `dir` and every missing parent up to `tree`, each 0755 whatever the umask.
fn make_dir(tree: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut current = Some(dir);
    while let Some(path) = current {
        set_mode(path, 0o755)?;
        if path == tree {
            break;
        }
        current = path.parent().filter(|p| p.starts_with(tree));
    }
    Ok(())
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {:o} {}", mode, path.display()))
}

fn dpkg_deb_build(tree: &Path, deb: &Path, compression: Option<&str>) -> anyhow::Result<()> {
    let mut command = Command::new("dpkg-deb");
    command.arg("--root-owner-group");
    if let Some(compression) = compression {
        command.arg(format!("-Z{compression}"));
    }
    command.arg("--build").arg(tree).arg(deb);
    eprintln!("xtask: dpkg-deb --build {}", tree.display());
    let output = command
        .output()
        .context("cannot run dpkg-deb: building .deb files needs dpkg (Debian or Ubuntu)")?;
    if !output.status.success() {
        bail!(
            "dpkg-deb --build {} failed ({}): {}{}",
            tree.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Just enough of ELF to list a binary's shared libraries and the symbol versions it needs.
mod elf {
    use anyhow::{Context, bail};

    const SHT_DYNAMIC: u32 = 6;
    const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;
    const DT_NEEDED: u64 = 1;

    pub struct Dynamic {
        /// DT_NEEDED: the shared libraries linked.
        pub needed: Vec<String>,
        /// The symbol versions needed from them, e.g. `GLIBC_2.34`.
        pub versions: Vec<String>,
    }

    struct Section {
        kind: u32,
        offset: usize,
        size: usize,
        link: usize,
    }

    impl Dynamic {
        /// Reads a 64-bit little-endian ELF file (x86-64, arm64, riscv64, ppc64el).
        pub fn read(bytes: &[u8]) -> anyhow::Result<Dynamic> {
            if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
                bail!("not an ELF file");
            }
            if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
                bail!("only 64-bit little-endian ELF files are supported");
            }
            let shoff = u64_at(bytes, 0x28)? as usize;
            let shentsize = u16_at(bytes, 0x3a)? as usize;
            let shnum = u16_at(bytes, 0x3c)? as usize;
            let mut sections = Vec::with_capacity(shnum);
            for i in 0..shnum {
                let base = shoff.saturating_add(i.saturating_mul(shentsize));
                sections.push(Section {
                    kind: u32_at(bytes, base + 4)?,
                    offset: u64_at(bytes, base + 0x18)? as usize,
                    size: u64_at(bytes, base + 0x20)? as usize,
                    link: u32_at(bytes, base + 0x28)? as usize,
                });
            }
            let strings = |section: &Section| -> anyhow::Result<&[u8]> {
                let table = sections
                    .get(section.link)
                    .context("bad string table link")?;
                bytes
                    .get(table.offset..table.offset.saturating_add(table.size))
                    .context("string table out of the file")
            };
            let mut dynamic = Dynamic {
                needed: Vec::new(),
                versions: Vec::new(),
            };
            for section in &sections {
                match section.kind {
                    SHT_DYNAMIC => {
                        let table = strings(section)?;
                        for entry in
                            (0..section.size / 16).map(|i| section.offset.saturating_add(i * 16))
                        {
                            if u64_at(bytes, entry)? == DT_NEEDED {
                                let name = u64_at(bytes, entry.saturating_add(8))? as usize;
                                dynamic.needed.push(c_string(table, name)?);
                            }
                        }
                    }
                    SHT_GNU_VERNEED => {
                        let table = strings(section)?;
                        // Verneed { version u16, cnt u16, file u32, aux u32, next u32 },
                        // each followed by Vernaux { hash u32, flags u16, other u16,
                        // name u32, next u32 } entries.
                        let mut need = section.offset;
                        loop {
                            let count = u16_at(bytes, need.saturating_add(2))?;
                            let mut aux = need
                                .saturating_add(u32_at(bytes, need.saturating_add(8))? as usize);
                            for _ in 0..count {
                                let name = u32_at(bytes, aux.saturating_add(8))? as usize;
                                dynamic.versions.push(c_string(table, name)?);
                                let next = u32_at(bytes, aux.saturating_add(12))? as usize;
                                if next == 0 {
                                    break;
                                }
                                aux = aux.saturating_add(next);
                            }
                            let next = u32_at(bytes, need.saturating_add(12))? as usize;
                            if next == 0 {
                                break;
                            }
                            need = need.saturating_add(next);
                        }
                    }
                    _ => {}
                }
            }
            Ok(dynamic)
        }
    }

    fn field<const N: usize>(bytes: &[u8], at: usize) -> anyhow::Result<[u8; N]> {
        bytes
            .get(at..at.saturating_add(N))
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("offset {at:#x} is out of the file"))
    }

    fn u16_at(bytes: &[u8], at: usize) -> anyhow::Result<u16> {
        field(bytes, at).map(u16::from_le_bytes)
    }

    fn u32_at(bytes: &[u8], at: usize) -> anyhow::Result<u32> {
        field(bytes, at).map(u32::from_le_bytes)
    }

    fn u64_at(bytes: &[u8], at: usize) -> anyhow::Result<u64> {
        field(bytes, at).map(u64::from_le_bytes)
    }

    fn c_string(table: &[u8], at: usize) -> anyhow::Result<String> {
        let rest = table.get(at..).context("string out of its table")?;
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .context("unterminated string")?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}
