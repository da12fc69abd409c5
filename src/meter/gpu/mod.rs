//! GPU telemetry sampled in the background, averaged per request window.
//!
//! Every request record carries the GPU's average utilization, clock and
//! power over the request's own time span (`"gpu"` in the JSONL record). A
//! [`GpuSampler`] keeps the last ten minutes of readings in a ring buffer and
//! [`GpuSampler::window`] averages the ones inside `[from, to]`.
//!
//! Where the readings come from is decided at run time:
//!
//! * macOS: `ioreg -r -c IOGPU -d 1` every interval gives the GPU's
//!   `Device Utilization %` without root. When `sudo -n` may run
//!   `powermetrics` (passwordless sudo), one long-running
//!   `powermetrics --samplers gpu_power -f plist` child adds clock and power;
//!   its NUL-separated plist records are read as they arrive. While `ioreg`
//!   works, utilization comes from `ioreg` alone, so its meaning does not
//!   depend on whether sudo is set up; `powermetrics`' active residency is
//!   used only when `ioreg` fails.
//! * Elsewhere: `nvidia-smi --query-gpu=utilization.gpu,clocks.sm,power.draw`
//!   every interval.
//!
//! When nothing can be sampled the sampler stops, logs why once
//! (`tracing::info!`) and reports it through
//! [`GpuSampler::unavailable_reason`].
//!
//! Each source has its own file: `macos.rs` (`ioreg`, `powermetrics`) and
//! `nvidia.rs` (`nvidia-smi`), with their commands, their sampling loops
//! and their parsers. Every parser is a pure function over captured
//! output, so all of them are tested on any OS. This file holds the
//! readings, the sampler and its window averages, the choice of source,
//! and what the sources share (running a command, giving up on one that
//! keeps failing).

mod macos;
mod nvidia;

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use macos::{parse_ioreg_performance, parse_powermetrics_records, split_nul_records};
pub use nvidia::parse_nvidia_smi_utilization;

/// One GPU reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuSample {
    /// Busy share of the GPU, 0–100.
    pub utilization_pct: Option<f64>,
    /// Clock in MHz (the SM clock on NVIDIA, the average active clock on Apple).
    pub freq_mhz: Option<f64>,
    /// Power draw in watts.
    pub power_w: Option<f64>,
}

/// Averages over a window, as stored in each request's log record under "gpu".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuWindow {
    /// Readings taken inside the window (on macOS `ioreg` and `powermetrics`
    /// readings are counted separately).
    pub samples: u32,
    /// Mean over the readings that carry a utilization.
    pub utilization_pct: Option<f64>,
    /// The highest of those readings.
    pub peak_utilization_pct: Option<f64>,
    /// Mean over the readings that carry a clock.
    pub freq_mhz: Option<f64>,
    /// Mean over the readings that carry a power draw.
    pub power_w: Option<f64>,
    /// Where the readings came from: `"ioreg"`, `"powermetrics"`,
    /// `"ioreg+powermetrics"`, `"nvidia-smi"`, `"manual"`, or `"mixed"`.
    pub source: &'static str,
}

// ---------------------------------------------------------------------------
// Shared by the parsers
// ---------------------------------------------------------------------------

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

impl GpuSample {
    fn is_empty(&self) -> bool {
        self.utilization_pct.is_none() && self.freq_mhz.is_none() && self.power_w.is_none()
    }
}

/// A running mean over the values that are present.
#[derive(Debug, Default, Clone, Copy)]
struct Mean {
    sum: f64,
    count: u32,
}

impl Mean {
    fn add(&mut self, value: Option<f64>) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            self.sum += v;
            self.count += 1;
        }
    }

    fn get(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / f64::from(self.count))
    }
}

// ---------------------------------------------------------------------------
// The sampler
// ---------------------------------------------------------------------------

/// How long readings are kept.
const RETENTION: Duration = Duration::from_secs(600);
/// Upper bound on kept readings, whatever the interval.
const MAX_SAMPLES: usize = 20_000;
/// Shortest sampling interval; shorter requests are raised to it.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// How long one `ioreg`/`nvidia-smi` run may take before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Failures in a row after which a command that used to work is given up.
const MAX_CONSECUTIVE_FAILURES: u32 = 3;

const SOURCE_MANUAL: &str = "manual";
const SOURCE_IOREG: &str = "ioreg";
const SOURCE_POWERMETRICS: &str = "powermetrics";
const SOURCE_NVIDIA_SMI: &str = "nvidia-smi";

/// Samples the GPU in the background and averages readings per time window.
///
/// Dropping the last `Arc` (or calling [`GpuSampler::shutdown`]) stops the
/// background task, which kills its `powermetrics` child.
pub struct GpuSampler {
    state: Mutex<State>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct State {
    readings: VecDeque<Reading>,
    unavailable: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    sample: GpuSample,
    source: &'static str,
}

impl GpuSampler {
    /// Starts sampling every `interval` on the backend for this platform;
    /// returns at once. Needs a tokio runtime; without one the sampler is
    /// unavailable from the start.
    pub fn start(interval: Duration) -> Arc<GpuSampler> {
        Self::start_backend(Backend::for_this_platform(interval), interval)
    }

    /// For tests: a sampler fed by hand, no commands.
    pub fn manual() -> Arc<GpuSampler> {
        Arc::new(GpuSampler {
            state: Mutex::new(State::default()),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Records a reading taken at `at`.
    pub fn push(&self, at: Instant, sample: GpuSample) {
        self.push_from(at, sample, SOURCE_MANUAL);
    }

    /// Averages of the samples taken in `[from, to]`; `None` when there are none.
    pub fn window(&self, from: Instant, to: Instant) -> Option<GpuWindow> {
        if to < from {
            return None;
        }
        let state = self.state();
        let mut samples: u32 = 0;
        let (mut utilization, mut freq, mut power) =
            (Mean::default(), Mean::default(), Mean::default());
        let mut sources = Sources::default();
        let mut peak: Option<f64> = None;
        for reading in state.readings.iter().filter(|r| r.at >= from && r.at <= to) {
            samples = samples.saturating_add(1);
            utilization.add(reading.sample.utilization_pct);
            if let Some(u) = reading.sample.utilization_pct.filter(|u| u.is_finite()) {
                peak = Some(peak.map_or(u, |p| p.max(u)));
            }
            freq.add(reading.sample.freq_mhz);
            power.add(reading.sample.power_w);
            sources.add(reading.source);
        }
        (samples > 0).then(|| GpuWindow {
            samples,
            utilization_pct: utilization.get(),
            peak_utilization_pct: peak,
            freq_mhz: freq.get(),
            power_w: power.get(),
            source: sources.label(),
        })
    }

    /// Why nothing is sampled (e.g. "no GPU telemetry: nvidia-smi not
    /// found"), or `None` while sampling works.
    pub fn unavailable_reason(&self) -> Option<String> {
        self.state().unavailable.clone()
    }

    /// Stops background sampling now (the `powermetrics` child is killed).
    /// Readings taken so far stay available.
    pub fn shutdown(&self) {
        let tasks = std::mem::take(&mut *crate::sync::lock(&self.tasks));
        for task in tasks {
            task.abort();
        }
    }

    fn start_backend(backend: Backend, interval: Duration) -> Arc<GpuSampler> {
        let sampler = Self::manual();
        let interval = interval.max(MIN_INTERVAL);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            sampler.set_unavailable("no GPU telemetry: no tokio runtime to sample on".to_owned());
            return sampler;
        };
        let weak = Arc::downgrade(&sampler);
        let task = match backend {
            Backend::Mac {
                ioreg,
                powermetrics,
            } => runtime.spawn(macos::run_mac(weak, ioreg, powermetrics, interval)),
            Backend::NvidiaSmi { nvidia_smi } => {
                runtime.spawn(nvidia::run_nvidia_smi(weak, nvidia_smi, interval))
            }
        };
        crate::sync::lock(&sampler.tasks).push(task.abort_handle());
        sampler
    }

    fn state(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    fn push_from(&self, at: Instant, sample: GpuSample, source: &'static str) {
        let mut state = self.state();
        if let Some(cutoff) = at.checked_sub(RETENTION) {
            while state.readings.front().is_some_and(|r| r.at < cutoff) {
                state.readings.pop_front();
            }
        }
        while state.readings.len() >= MAX_SAMPLES {
            state.readings.pop_front();
        }
        state.readings.push_back(Reading { at, sample, source });
    }

    /// Records why sampling stopped and logs it, once.
    fn set_unavailable(&self, reason: String) {
        let mut state = self.state();
        if state.unavailable.is_none() {
            tracing::info!("GPU sampling off: {reason}");
            state.unavailable = Some(reason);
        }
    }
}

impl Drop for GpuSampler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for GpuSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("GpuSampler")
            .field("readings", &state.readings.len())
            .field("unavailable", &state.unavailable)
            .finish()
    }
}

/// Which sources contributed to a window.
#[derive(Debug, Default, Clone, Copy)]
struct Sources {
    first: Option<&'static str>,
    ioreg: bool,
    powermetrics: bool,
    other_mix: bool,
}

impl Sources {
    fn add(&mut self, source: &'static str) {
        self.ioreg |= source == SOURCE_IOREG;
        self.powermetrics |= source == SOURCE_POWERMETRICS;
        match self.first {
            None => self.first = Some(source),
            Some(first) if first != source => {
                let apple = |s: &str| s == SOURCE_IOREG || s == SOURCE_POWERMETRICS;
                self.other_mix |= !(apple(first) && apple(source));
            }
            Some(_) => {}
        }
    }

    fn label(&self) -> &'static str {
        if self.other_mix {
            "mixed"
        } else if self.ioreg && self.powermetrics {
            "ioreg+powermetrics"
        } else {
            self.first.unwrap_or(SOURCE_MANUAL)
        }
    }
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A command to run: program and arguments.
#[derive(Debug, Clone)]
struct CommandSpec {
    program: String,
    args: Vec<String>,
}

impl CommandSpec {
    fn new(program: &str, args: &[&str]) -> Self {
        CommandSpec {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// The name used in messages: the program, or the real tool behind `sudo`.
    fn name(&self) -> &str {
        let program = if self.program == "sudo" {
            self.args
                .iter()
                .find(|a| !a.starts_with('-'))
                .map_or(self.program.as_str(), String::as_str)
        } else {
            self.program.as_str()
        };
        program.rsplit('/').next().unwrap_or(program)
    }

    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Mac {
        ioreg: CommandSpec,
        powermetrics: CommandSpec,
    },
    NvidiaSmi {
        nvidia_smi: CommandSpec,
    },
}

impl Backend {
    fn for_this_platform(interval: Duration) -> Backend {
        if cfg!(target_os = "macos") {
            Backend::mac(interval)
        } else {
            Backend::nvidia_smi()
        }
    }
}

/// Runs a command to completion (killed after [`COMMAND_TIMEOUT`]) and
/// returns its standard output, or why it failed.
async fn run_capture(spec: &CommandSpec) -> Result<String, String> {
    let name = spec.name();
    let child = spec.command().spawn().map_err(|e| spawn_error(name, &e))?;
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{name} did not answer within {} s",
                COMMAND_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("{name} failed: {e}"))?;
    if !output.status.success() {
        let said = first_line(&output.stderr).or_else(|| first_line(&output.stdout));
        return Err(match said {
            Some(said) => format!("{name} failed ({}): {said}", output.status),
            None => format!("{name} failed ({})", output.status),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn spawn_error(name: &str, error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        format!("{name} not found")
    } else {
        format!("{name} could not be started: {error}")
    }
}

/// The first non-blank line of some output, shortened.
fn first_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(200).collect())
}

/// Tracks whether a polled command still works.
#[derive(Debug, Default)]
struct Health {
    ever_worked: bool,
    failures_in_a_row: u32,
    given_up: Option<String>,
}

impl Health {
    fn alive(&self) -> bool {
        self.given_up.is_none()
    }

    fn success(&mut self) {
        self.ever_worked = true;
        self.failures_in_a_row = 0;
    }

    /// Counts a failure; a command that never worked, or failed too often in
    /// a row, is given up.
    fn failure(&mut self, why: String) {
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        if !self.ever_worked || self.failures_in_a_row >= MAX_CONSECUTIVE_FAILURES {
            self.given_up = Some(why);
        } else {
            tracing::debug!("GPU sample failed: {why}");
        }
    }
}

fn ticker(interval: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/{name}",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpu")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    pub(super) fn fixture_text(name: &str) -> String {
        String::from_utf8(fixture(name)).expect("fixture is UTF-8")
    }

    #[track_caller]
    pub(super) fn assert_close(actual: Option<f64>, expected: f64) {
        let actual = actual.unwrap_or_else(|| panic!("expected {expected}, got None"));
        assert!(
            (actual - expected).abs() < 1e-9,
            "expected {expected}, got {actual}"
        );
    }

    pub(super) fn utilization(pct: f64) -> GpuSample {
        GpuSample {
            utilization_pct: Some(pct),
            freq_mhz: None,
            power_w: None,
        }
    }

    // --- the sampler ---

    fn sample(util: f64, freq: Option<f64>, power: Option<f64>) -> GpuSample {
        GpuSample {
            utilization_pct: Some(util),
            freq_mhz: freq,
            power_w: power,
        }
    }

    #[test]
    fn window_averages_only_samples_inside() {
        let sampler = GpuSampler::manual();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        sampler.push(at(0), sample(90.0, Some(1000.0), Some(50.0)));
        sampler.push(at(1), sample(10.0, Some(1200.0), None));
        sampler.push(at(2), sample(30.0, None, Some(20.0)));
        sampler.push(at(3), sample(50.0, Some(1400.0), Some(40.0)));
        sampler.push(at(4), sample(99.0, Some(9999.0), Some(999.0)));

        let window = sampler.window(at(1), at(3)).expect("a window");
        assert_eq!(window.samples, 3);
        assert_close(window.utilization_pct, 30.0);
        assert_close(window.peak_utilization_pct, 50.0);
        assert_close(window.freq_mhz, 1300.0);
        assert_close(window.power_w, 30.0);
        assert_eq!(window.source, "manual");

        let one = sampler
            .window(at(4), at(4))
            .expect("the bounds are inclusive");
        assert_eq!(one.samples, 1);

        let json = serde_json::to_value(&window).expect("serializes");
        assert_eq!(json["samples"], 3);
        assert_eq!(json["source"], "manual");
    }

    #[test]
    fn window_without_samples_is_none() {
        let sampler = GpuSampler::manual();
        let t0 = Instant::now();
        assert_eq!(sampler.window(t0, t0 + Duration::from_secs(60)), None);
        sampler.push(t0 + Duration::from_secs(10), utilization(50.0));
        assert_eq!(sampler.window(t0, t0 + Duration::from_secs(5)), None);
        assert_eq!(
            sampler.window(t0 + Duration::from_secs(20), t0 + Duration::from_secs(30)),
            None
        );
        // A reversed window is empty, not a panic.
        assert_eq!(sampler.window(t0 + Duration::from_secs(20), t0), None);
        assert_eq!(sampler.unavailable_reason(), None);
    }

    #[test]
    fn window_with_readings_but_no_values_has_none_fields() {
        let sampler = GpuSampler::manual();
        let t0 = Instant::now();
        let empty = GpuSample {
            utilization_pct: None,
            freq_mhz: None,
            power_w: None,
        };
        sampler.push(t0, empty);
        let window = sampler.window(t0, t0).expect("one reading");
        assert_eq!(window.samples, 1);
        assert_eq!(
            (window.utilization_pct, window.freq_mhz, window.power_w),
            (None, None, None)
        );
    }

    #[test]
    fn old_readings_are_dropped() {
        let sampler = GpuSampler::manual();
        let t0 = Instant::now();
        sampler.push(t0, utilization(10.0));
        sampler.push(t0 + RETENTION + Duration::from_secs(1), utilization(20.0));
        assert_eq!(sampler.window(t0, t0), None);
        assert_eq!(sampler.state().readings.len(), 1);
    }

    #[test]
    fn window_sources_are_labelled() {
        let t0 = Instant::now();
        let sampler = GpuSampler::manual();
        sampler.push_from(t0, utilization(10.0), SOURCE_IOREG);
        sampler.push_from(t0, utilization(10.0), SOURCE_POWERMETRICS);
        assert_eq!(
            sampler.window(t0, t0).map(|w| w.source),
            Some("ioreg+powermetrics")
        );
        sampler.push_from(t0, utilization(10.0), SOURCE_NVIDIA_SMI);
        assert_eq!(sampler.window(t0, t0).map(|w| w.source), Some("mixed"));
    }

    #[test]
    fn sampler_without_runtime_is_unavailable() {
        let sampler = GpuSampler::start(Duration::from_secs(1));
        let reason = sampler.unavailable_reason().expect("a reason");
        assert!(reason.contains("no tokio runtime"), "{reason}");
    }

    /// Polls until the sampler gives up, or fails after a generous deadline.
    pub(super) async fn wait_unavailable(sampler: &GpuSampler) -> String {
        let wait = async {
            loop {
                if let Some(reason) = sampler.unavailable_reason() {
                    return reason;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("the sampler settles")
    }

    /// How many readings came from `source`.
    pub(super) fn readings_from(sampler: &GpuSampler, source: &str) -> usize {
        let state = sampler.state();
        state.readings.iter().filter(|r| r.source == source).count()
    }

    /// Polls until `ready` holds, then returns a window over all readings.
    pub(super) async fn wait_for_window(
        sampler: &GpuSampler,
        ready: impl Fn(&GpuSampler) -> bool,
    ) -> GpuWindow {
        let start = Instant::now();
        // powermetrics readings are dated half a sample back.
        let t0 = start.checked_sub(Duration::from_secs(5)).unwrap_or(start);
        let wait = async {
            loop {
                if ready(sampler) {
                    if let Some(window) = sampler.window(t0, Instant::now()) {
                        return window;
                    }
                }
                if let Some(reason) = sampler.unavailable_reason() {
                    panic!("sampler gave up: {reason}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("samples arrive")
    }

    pub(super) fn sh(script: &str) -> CommandSpec {
        CommandSpec::new("sh", &["-c", script])
    }

    pub(super) fn fixture_path(name: &str) -> String {
        format!(
            "{}/{name}",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpu")
        )
    }

    #[tokio::test]
    async fn start_settles_into_unavailable_without_gpu_tools() {
        let on_path = |tool: &str| {
            std::env::var_os("PATH")
                .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        };
        if cfg!(target_os = "macos") || on_path("nvidia-smi") {
            eprintln!("skipped: this machine has GPU telemetry tools");
            return;
        }
        let sampler = GpuSampler::start(Duration::from_millis(100));
        let reason = wait_unavailable(&sampler).await;
        assert_eq!(reason, "no GPU telemetry: nvidia-smi not found");
    }

    #[test]
    fn platform_commands() {
        let Backend::Mac {
            ioreg,
            powermetrics,
        } = Backend::mac(Duration::from_millis(1500))
        else {
            panic!("a macOS backend");
        };
        assert_eq!(ioreg.name(), "ioreg");
        assert_eq!(powermetrics.name(), "powermetrics");
        assert_eq!(
            powermetrics.args.join(" "),
            "-n /usr/bin/powermetrics --samplers gpu_power -i 1500 -f plist"
        );
        let Backend::NvidiaSmi { nvidia_smi } = Backend::nvidia_smi() else {
            panic!("an nvidia-smi backend");
        };
        assert_eq!(nvidia_smi.name(), "nvidia-smi");
    }
}
