//! PNG plots (plotters, bitmap backend, text through ab_glyph).
//!
//! plotters is built without C font libraries, so a TrueType font is loaded at run time
//! ([`FONT_ENV`], then common system paths) and registered as `sans-serif`. Without one, every
//! plot is skipped with a clear message that the report lists; nothing here panics on data
//! (each plot also runs under `catch_unwind` in case plotters itself does).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::markdown::{file_stem, latency_links, peer_mean_ms, session_stats, size_label};
use super::stats::{mean, std_dev};
use super::{Report, Subject};

/// Environment variable naming a TrueType font file for the plots.
pub const FONT_ENV: &str = "KEAV_BENCH_FONT";

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

const NO_FONT: &str = "no TrueType font found; set KEAV_BENCH_FONT=/path/to/font.ttf";
const SIZE: (u32, u32) = (1024, 640);
const FONT: &str = "sans-serif";

/// Loads and registers a font once per process.
fn ensure_font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os(FONT_ENV) {
            candidates.push(PathBuf::from(p));
        }
        candidates.extend(FONT_PATHS.iter().map(PathBuf::from));
        for p in candidates {
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            // plotters keeps fonts for the life of the process: leak one font, once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
        Err(NO_FONT.to_string())
    })
    .clone()
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Runs one plot, turning errors and panics into a message naming the file.
fn attempt(
    name: &str,
    dir: &Path,
    ok: &mut Vec<PathBuf>,
    errs: &mut Vec<String>,
    f: impl FnOnce(&Path) -> Result<(), String>,
) {
    let path = dir.join(name);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&path)));
    match r {
        Ok(Ok(())) => ok.push(path),
        Ok(Err(e)) => errs.push(format!("{name}: {e}")),
        Err(_) => errs.push(format!("{name}: the plotting library failed")),
    }
}

/// Draws every plot the report has data for. Returns the files written and, for plots that
/// could not be drawn, why.
pub fn draw_all(r: &Report, dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let mut wanted: Vec<String> = latency_links(r)
        .iter()
        .map(|l| format!("latency_{}.png", file_stem(l)))
        .collect();
    for (name, has) in [
        ("cpu.png", !r.cpu.is_empty()),
        ("records.png", !r.records.is_empty()),
        ("wire.png", !r.wire.is_empty()),
        ("memory.png", !r.memory.is_empty()),
        ("broker.png", !r.broker.is_empty() || !r.drain.is_empty()),
        ("c2.png", super::c2::has_rows(r)),
    ] {
        if has {
            wanted.push(name.into());
        }
    }
    if wanted.is_empty() {
        return (Vec::new(), Vec::new());
    }
    if let Err(e) = ensure_font() {
        return (
            Vec::new(),
            wanted.iter().map(|w| format!("{w}: {e}")).collect(),
        );
    }
    let (mut ok, mut errs) = (Vec::new(), Vec::new());
    for link in latency_links(r) {
        let name = format!("latency_{}.png", file_stem(&link));
        attempt(&name, dir, &mut ok, &mut errs, |p| latency(r, link, p));
    }
    if !r.cpu.is_empty() {
        attempt("cpu.png", dir, &mut ok, &mut errs, |p| cpu(r, p));
    }
    if !r.records.is_empty() {
        attempt("records.png", dir, &mut ok, &mut errs, |p| records(r, p));
    }
    if !r.wire.is_empty() {
        attempt("wire.png", dir, &mut ok, &mut errs, |p| wire(r, p));
    }
    if !r.memory.is_empty() {
        attempt("memory.png", dir, &mut ok, &mut errs, |p| memory(r, p));
    }
    if !r.broker.is_empty() || !r.drain.is_empty() {
        attempt("broker.png", dir, &mut ok, &mut errs, |p| broker(r, p));
    }
    if super::c2::has_rows(r) {
        attempt("c2.png", dir, &mut ok, &mut errs, |p| super::c2::plot(r, p));
    }
    (ok, errs)
}

fn mode_color(s: Subject) -> RGBColor {
    match s {
        Subject::KeavNoContinuity => RGBColor(0x1f, 0x77, 0xb4),
        Subject::KeavNormal => RGBColor(0x2c, 0xa0, 0x2c),
        Subject::KeavParanoid => RGBColor(0xd6, 0x27, 0x28),
        Subject::TlsFullOcsp => RGBColor(0x55, 0x55, 0x55),
        Subject::TlsResumed => RGBColor(0x99, 0x66, 0x00),
        Subject::NoiseXx => RGBColor(0x94, 0x67, 0xbd),
    }
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

fn latency(r: &Report, link: crate::options::LinkModel, path: &Path) -> Result<(), String> {
    // (subject, [(session, mean, std)] with, [(session, mean)] without)
    type Line = (Subject, Vec<(f64, f64, f64)>, Vec<(f64, f64)>);
    let mut lines: Vec<Line> = Vec::new();
    let mut max_session = 1u32;
    let mut ymax: f64 = 1.0;
    for subj in Subject::KEAV {
        let st = session_stats(r, link, subj);
        if st.is_empty() {
            continue;
        }
        let with: Vec<(f64, f64, f64)> = st
            .iter()
            .filter(|s| !s.with.is_empty())
            .map(|s| (f64::from(s.session), mean(&s.with), std_dev(&s.with)))
            .collect();
        let without: Vec<(f64, f64)> = st
            .iter()
            .filter(|s| !s.without.is_empty())
            .map(|s| (f64::from(s.session), mean(&s.without)))
            .collect();
        for s in &st {
            max_session = max_session.max(s.session);
        }
        for (_, m, sd) in &with {
            ymax = ymax.max(m + sd);
        }
        for (_, m) in &without {
            ymax = ymax.max(*m);
        }
        lines.push((subj, with, without));
    }
    let refs: Vec<(Subject, f64)> = Subject::PEERS
        .into_iter()
        .filter_map(|p| peer_mean_ms(r, link, p).map(|m| (p, m)))
        .collect();
    for (_, m) in &refs {
        ymax = ymax.max(*m);
    }
    let x_hi = f64::from(max_session) + 0.5;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Provisioning latency over {} (solid: with verification, dashed: without)",
                link.name()
            ),
            (FONT, 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..x_hi, 0f64..ymax * 1.6)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("session")
        .y_desc("ms (mean ± std)")
        .x_labels((max_session as usize).min(20))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    for (subj, with, without) in &lines {
        let c = mode_color(*subj);
        chart
            .draw_series(LineSeries::new(
                with.iter().map(|(x, m, _)| (*x, *m)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("{} (with)", subj.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(
                with.iter()
                    .map(|(x, m, s)| ErrorBar::new_vertical(*x, m - s, *m, m + s, c.filled(), 8)),
            )
            .map_err(err)?;
        if !without.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(
                    without.clone(),
                    8,
                    5,
                    c.stroke_width(1),
                ))
                .map_err(err)?
                .label(format!("{} (without)", subj.name()))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 20, y)], 4, 3, c.stroke_width(1))
                });
        }
    }
    for (p, m) in refs {
        let c = mode_color(p);
        chart
            .draw_series(LineSeries::new(
                vec![(0.5, m), (x_hi, m)],
                c.mix(0.7).stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("{} (mean)", p.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// A horizontal grouped bar chart: one band per category (top to bottom), one bar per
/// series inside it. `log`: the axis shows log10 of the values.
fn hbar(
    path: &Path,
    title: &str,
    x_desc: &str,
    categories: &[String],
    series: &[(String, Vec<Option<f64>>)],
    log: bool,
) -> Result<(), String> {
    let n = categories.len();
    if n == 0 || series.is_empty() {
        return Err("no data".into());
    }
    let tr = |v: f64| if log { v.max(1.0).log10() } else { v };
    let vals = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .filter(|v| v.is_finite());
    let (lo, hi) = vals.fold((f64::INFINITY, 0f64), |(lo, hi), v| {
        (lo.min(tr(v)), hi.max(tr(v)))
    });
    if !hi.is_finite() || hi <= 0.0 {
        return Err("no positive values to plot".into());
    }
    let x_lo = if log {
        (lo - 0.3).floor().max(0.0)
    } else {
        0.0
    };
    let x_hi = if log { hi + 0.3 } else { hi * 1.1 };
    let label_width = categories
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(10) as u32
        * 8
        + 20;
    let height = SIZE.1.max(120 + 40 * n as u32 * series.len().min(4) as u32);
    let root = BitMapBackend::new(path, (SIZE.0, height.min(2000))).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let cats: Vec<String> = categories.to_vec();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(label_width.min(460))
        .build_cartesian_2d(x_lo..x_hi, -0.5f64..(n as f64 - 0.5))
        .map_err(err)?;
    let y_fmt = move |v: &f64| {
        let i = v.round();
        if (v - i).abs() > 0.01 || i < 0.0 {
            return String::new();
        }
        let idx = (n as f64 - 1.0 - i) as usize;
        cats.get(idx).cloned().unwrap_or_default()
    };
    let x_fmt = move |v: &f64| {
        if log {
            if (v - v.round()).abs() > 0.01 {
                return String::new();
            }
            let x = 10f64.powf(v.round());
            if x >= 1e4 {
                format!("{:.0}k", x / 1000.0)
            } else {
                format!("{x:.0}")
            }
        } else {
            format!("{v:.0}")
        }
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n.max(1))
        .y_label_formatter(&y_fmt)
        .x_label_formatter(&x_fmt)
        .x_desc(x_desc)
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    let k = series.len() as f64;
    let band = 0.8;
    for (si, (name, values)) in series.iter().enumerate() {
        let c = PALETTE[si % PALETTE.len()];
        let rects: Vec<Rectangle<(f64, f64)>> = values
            .iter()
            .enumerate()
            .filter_map(|(ci, v)| {
                let v = (*v)?;
                let y_center = n as f64 - 1.0 - ci as f64;
                let top = y_center + band / 2.0 - band / k * si as f64;
                let bottom = top - band / k * 0.9;
                Some(Rectangle::new([(x_lo, bottom), (tr(v), top)], c.filled()))
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn cpu(r: &Report, path: &Path) -> Result<(), String> {
    let cats: Vec<String> = r.cpu.iter().map(|c| c.subject.clone()).collect();
    let series = vec![
        (
            "initiator".to_string(),
            r.cpu.iter().map(|c| Some(c.initiator_us)).collect(),
        ),
        (
            "responder".to_string(),
            r.cpu.iter().map(|c| Some(c.responder_us)).collect(),
        ),
    ];
    hbar(
        path,
        "CPU per handshake (median)",
        "µs",
        &cats,
        &series,
        false,
    )
}

fn records(r: &Report, path: &Path) -> Result<(), String> {
    let mut sizes: Vec<usize> = r.records.iter().map(|x| x.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut subjects: Vec<&str> = Vec::new();
    for x in &r.records {
        if !subjects.contains(&x.subject.as_str()) {
            subjects.push(&x.subject);
        }
    }
    let cats: Vec<String> = sizes.iter().map(|s| format!("{s} B")).collect();
    let series: Vec<(String, Vec<Option<f64>>)> = subjects
        .iter()
        .map(|s| {
            let v = sizes
                .iter()
                .map(|z| {
                    r.records
                        .iter()
                        .find(|x| x.size == *z && x.subject == *s)
                        .map(|x| x.ns_median)
                })
                .collect();
            (s.to_string(), v)
        })
        .collect();
    let (lo, hi) = r
        .records
        .iter()
        .map(|x| x.ns_median)
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let log = hi / lo > 30.0;
    hbar(
        path,
        "Record seal + open (median ns per record)",
        if log { "ns (log scale)" } else { "ns" },
        &cats,
        &series,
        log,
    )
}

fn wire(r: &Report, path: &Path) -> Result<(), String> {
    let cats: Vec<String> = r
        .wire
        .iter()
        .map(|w| format!("{} {}", w.subject, w.kind))
        .collect();
    let series = vec![
        (
            "initiator bytes".to_string(),
            r.wire
                .iter()
                .map(|w| Some(w.initiator_bytes as f64))
                .collect(),
        ),
        (
            "responder bytes".to_string(),
            r.wire
                .iter()
                .map(|w| Some(w.responder_bytes as f64))
                .collect(),
        ),
    ];
    hbar(
        path,
        "Bytes on the wire per handshake",
        "bytes",
        &cats,
        &series,
        false,
    )
}

fn memory(r: &Report, path: &Path) -> Result<(), String> {
    let cats: Vec<String> = r.memory.iter().map(|m| m.subject.clone()).collect();
    let series = vec![(
        "bytes per session".to_string(),
        r.memory
            .iter()
            .map(|m| Some(m.bytes_per_session.max(0.0)))
            .collect(),
    )];
    hbar(
        path,
        "Memory per idle session",
        "bytes",
        &cats,
        &series,
        false,
    )
}

/// Named bars, one value per category (`None`: no bar).
type Series = Vec<(String, Vec<Option<f64>>)>;

/// The series of the broker plot, one value per category (`None`: no bar): plaintext, keav
/// live, keav durable and keav durable paced per broker and size, then the mailbox drains
/// (keav durable only). Returns the categories and the series.
pub(crate) fn broker_series(r: &Report) -> (Vec<String>, Series) {
    let mut cats: Vec<String> = Vec::new();
    let (mut plain, mut live, mut single, mut durable, mut paced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for x in &r.broker {
        cats.push(format!("{} {}", x.broker, size_label(x.size)));
        plain.push(Some(x.plain_msgs_per_s));
        live.push(x.live_msgs_per_s);
        single.push(x.live_single_msgs_per_s);
        durable.push(Some(x.keav_msgs_per_s));
        paced.push(x.keav_paced_msgs_per_s);
    }
    for d in &r.drain {
        cats.push(format!("{} mailbox drain ({} held)", d.broker, d.held));
        plain.push(None);
        live.push(None);
        single.push(None);
        durable.push(Some(d.drain_msgs_per_s));
        paced.push(None);
    }
    let series = vec![
        ("plaintext (same broker)".to_string(), plain),
        ("keav live channel (encrypted)".to_string(), live),
        ("keav live, a broker message per record".to_string(), single),
        ("keav durable (stored, acked)".to_string(), durable),
        ("keav durable paced (flush every burst)".to_string(), paced),
    ];
    (cats, series)
}

/// Messages per second through brokers ([`broker_series`]).
fn broker(r: &Report, path: &Path) -> Result<(), String> {
    let (cats, series) = broker_series(r);
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, v)| v.iter())
        .flatten()
        .copied()
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let log = hi / lo > 30.0;
    hbar(
        path,
        "Messages per second through brokers",
        if log { "msg/s (log scale)" } else { "msg/s" },
        &cats,
        &series,
        log,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_plot_as_png() {
        let r = crate::report::markdown::tests::synthetic();
        let dir = tempfile::tempdir().unwrap();
        let (ok, errs) = draw_all(&r, dir.path());
        if errs.iter().any(|e| e.contains("no TrueType font")) {
            // A machine without any font: the message must say how to fix it.
            assert!(ok.is_empty());
            assert!(errs.iter().all(|e| e.contains(FONT_ENV)), "{errs:?}");
            return;
        }
        assert!(errs.is_empty(), "{errs:?}");
        let names: Vec<String> = ok
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "latency_70ms.png",
                "cpu.png",
                "records.png",
                "wire.png",
                "memory.png",
                "broker.png"
            ]
        );
        for p in &ok {
            let b = std::fs::read(p).unwrap();
            assert!(b.len() > 1000, "{p:?} is tiny");
            assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{p:?}");
        }
        if let Ok(keep) = std::env::var("KEAV_BENCH_KEEP_PLOTS") {
            for p in &ok {
                std::fs::copy(p, Path::new(&keep).join(p.file_name().unwrap())).unwrap();
            }
        }
        // The broker plot shows plaintext, live, durable and paced bars per row, and the
        // drains as durable bars only.
        let (cats, series) = broker_series(&r);
        assert_eq!(cats.len(), r.broker.len() + r.drain.len());
        let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "plaintext (same broker)",
                "keav live channel (encrypted)",
                "keav live, a broker message per record",
                "keav durable (stored, acked)",
                "keav durable paced (flush every burst)"
            ]
        );
        let x = &r.broker[0];
        let first: Vec<Option<f64>> = series.iter().map(|(_, v)| v[0]).collect();
        assert_eq!(
            first,
            [
                Some(x.plain_msgs_per_s),
                x.live_msgs_per_s,
                x.live_single_msgs_per_s,
                Some(x.keav_msgs_per_s),
                x.keav_paced_msgs_per_s
            ]
        );
        let last: Vec<Option<f64>> = series.iter().map(|(_, v)| *v.last().unwrap()).collect();
        assert_eq!(
            last,
            [
                None,
                None,
                None,
                Some(r.drain.last().unwrap().drain_msgs_per_s),
                None
            ]
        );
        // Nothing to draw: nothing written, no error.
        let (ok, errs) = draw_all(&Report::default(), dir.path());
        assert!(ok.is_empty() && errs.is_empty());
    }
}
