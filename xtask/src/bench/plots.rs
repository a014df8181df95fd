//! `cargo xtask bench plots` (and `bench compare --plots`): the pictures of BENCHMARKS.md,
//! drawn with plotters from the JSON the benchmarks left in `<target dir>/bench/`:
//!
//! - `compare-cut-backlog.png`, from `compare.json`: events acknowledged to the scanners and not
//!   yet in the ledger, over the seconds since the link was cut, for both pipelines;
//! - `ingest-rate.png`, from `ingest.json`: acknowledged events per second against the number
//!   of publishers, for the agent (each PUBACK after a flush to disk) and Mosquitto (messages
//!   its one subscriber received, persistence off).
//!
//! What it owns: reading those two files, the plots' look, and the font. Text needs a TrueType
//! font, and plotters is built without a system font lookup: DejaVu Sans (Debian's
//! fonts-dejavu-core) is read from the system's font directory when it is there; without it
//! the plots are drawn with no text at all, and BENCHMARKS.md says what the axes and colours are.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde_json::Value;

const SIZE: (u32, u32) = (1000, 520);
const BACKHAUL: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const MOSQUITTO: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const MARKS: RGBColor = RGBColor(0x30, 0x30, 0x30);
/// Where Debian installs fonts, and the font looked for there.
const FONT_DIR: &str = "/usr/share/fonts";
const FONT_FILE: &str = "DejaVuSans.ttf";

/// Draws every plot whose JSON is in `bench_dir` into `docs`; fails when there is none.
pub fn draw(bench_dir: &Path, docs: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(docs).with_context(|| format!("cannot create {}", docs.display()))?;
    let text = register_font();
    if !text {
        eprintln!(
            "xtask: bench plots: no {FONT_FILE} under {FONT_DIR} (Debian's fonts-dejavu-core): drawing without text"
        );
    }
    let mut drawn = Vec::new();
    let compare = bench_dir.join("compare.json");
    if compare.is_file() {
        let out = docs.join("compare-cut-backlog.png");
        cut_backlog(&read_json(&compare)?, &out, text)
            .with_context(|| format!("drawing {}", out.display()))?;
        drawn.push(out);
    }
    let ingest = bench_dir.join("ingest.json");
    if ingest.is_file() {
        let out = docs.join("ingest-rate.png");
        ingest_rate(&read_json(&ingest)?, &out, text)
            .with_context(|| format!("drawing {}", out.display()))?;
        drawn.push(out);
    }
    if drawn.is_empty() {
        bail!(
            "neither {} nor {} is there: run `cargo xtask bench compare` or `cargo xtask bench ingest` first",
            compare.display(),
            ingest.display()
        );
    }
    for path in drawn {
        println!("plot: {}", path.display());
    }
    Ok(())
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Registers DejaVu Sans as plotters' "sans-serif"; whether there is one.
fn register_font() -> bool {
    let Some(path) = find_file(Path::new(FONT_DIR), FONT_FILE, 4) else {
        return false;
    };
    let Ok(bytes) = std::fs::read(&path) else {
        return false;
    };
    // plotters keeps fonts for the life of the program.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

fn find_file(dir: &Path, name: &str, depth: u32) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut dirs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            dirs.push(path);
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    if depth == 0 {
        return None;
    }
    dirs.sort();
    dirs.iter().find_map(|d| find_file(d, name, depth - 1))
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotters: {e:?}")
}

/// (seconds since the cut, backlog) of one pipeline's cut, and when the link came back.
fn cut_series(report: &Value, kind: &str) -> Option<(Vec<(f64, f64)>, f64)> {
    let run = &report["cut"][kind];
    let points = run["backlog_series"]
        .as_array()?
        .iter()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect::<Vec<_>>();
    (!points.is_empty()).then(|| (points, run["restore_at_seconds"].as_f64().unwrap_or(0.0)))
}

/// A pipeline's line: its label, colour, points, and when its link came back.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>, f64);

fn cut_backlog(report: &Value, out: &Path, text: bool) -> anyhow::Result<()> {
    let series: Vec<Series> = [
        ("backhaul", "Backhaul (agent → relay)", BACKHAUL),
        ("bridge", "Mosquitto bridge", MOSQUITTO),
    ]
    .into_iter()
    .filter_map(|(kind, label, colour)| {
        cut_series(report, kind).map(|(points, restore)| (label, colour, points, restore))
    })
    .collect();
    if series.is_empty() {
        bail!("compare.json has no cut scenario (run it with --scenarios cut)");
    }
    let x_min = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(0.0, f64::min);
    let x_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        let cut = report["settings"]["cut_seconds"].as_f64().unwrap_or(0.0);
        let rate = report["settings"]["steady_rate"].as_f64().unwrap_or(0.0);
        builder
            .caption(
                format!(
                    "Backlog during a {cut:.0} s link cut at {rate:.0} events/s (acknowledged, not yet in the ledger)"
                ),
                ("sans-serif", 20),
            )
            .x_label_area_size(45)
            .y_label_area_size(80);
    } else {
        builder.x_label_area_size(5).y_label_area_size(5);
    }
    let mut chart = builder
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)
        .map_err(plot_error)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("seconds since the link was cut")
            .y_desc("events")
            .y_label_formatter(&|v| format!("{v:.0}"));
    } else {
        mesh.x_labels(0)
            .y_labels(0)
            .disable_x_axis()
            .disable_y_axis();
    }
    mesh.draw().map_err(plot_error)?;
    // The cut and the restore (the same moment for both pipelines, give or take a poll), as
    // dashes, so that they stand apart from the mesh.
    let restore = series.iter().map(|s| s.3).fold(0.0, f64::max);
    for x in [0.0, restore] {
        let dashes = 30;
        chart
            .draw_series((0..dashes).step_by(2).map(|i| {
                let y = |k: i32| y_max * f64::from(k) / f64::from(dashes);
                PathElement::new([(x, y(i)), (x, y(i + 1))], MARKS.stroke_width(2))
            }))
            .map_err(plot_error)?;
    }
    for (label, colour, points, _) in &series {
        let drawn = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(plot_error)?;
        if text {
            let colour = *colour;
            drawn.label(*label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn ingest_rate(report: &Value, out: &Path, text: bool) -> anyhow::Result<()> {
    let runs = report["runs"]
        .as_array()
        .context("ingest.json has no runs")?;
    let points = |side: &str| -> Vec<(f64, f64)> {
        runs.iter()
            .filter_map(|r| {
                Some((
                    r["publishers"].as_f64()?,
                    r[side]["events_per_second"].as_f64()?,
                ))
            })
            .collect()
    };
    let agent = points("agent");
    let mosquitto = points("mosquitto");
    if agent.is_empty() && mosquitto.is_empty() {
        bail!("ingest.json has no rates");
    }
    let all = || agent.iter().chain(&mosquitto);
    let x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min).max(1.0);
    let x_max = all().map(|p| p.0).fold(1.0, f64::max);
    // A log axis needs some room either side of a single count.
    let (x_min, x_max) = (x_min / 1.5, x_max * 1.5);
    let y_max = all().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(
                "Acknowledged MQTT QoS 1 ingest against publishers",
                ("sans-serif", 20),
            )
            .x_label_area_size(45)
            .y_label_area_size(80);
    } else {
        builder.x_label_area_size(5).y_label_area_size(5);
    }
    let mut chart = builder
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max)
        .map_err(plot_error)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("publishers (log scale)")
            .y_desc("events per second")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"));
    } else {
        mesh.x_labels(0)
            .y_labels(0)
            .disable_x_axis()
            .disable_y_axis();
    }
    mesh.draw().map_err(plot_error)?;
    for (label, colour, points) in [
        (
            "backhaul-agent: PUBACKs/s, each after a flush to disk",
            BACKHAUL,
            &agent,
        ),
        (
            "Mosquitto: messages/s to one subscriber (persistence off)",
            MOSQUITTO,
            &mosquitto,
        ),
    ] {
        let drawn = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(plot_error)?;
        if text {
            drawn.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        }
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))
            .map_err(plot_error)?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}
