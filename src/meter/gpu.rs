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
//! [`GpuSampler::unavailable_reason`]. Every parser here is a pure function
//! over captured output, so all of them are tested on any OS.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use plist::{Dictionary, Value};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdout};

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
// Parsers
// ---------------------------------------------------------------------------

/// Reads the utilization from `ioreg -r -c IOGPU -d 1` output.
///
/// Each GPU entry has a one-line `"PerformanceStatistics" = {…}` dictionary;
/// its `"Device Utilization %"` (else `"Renderer Utilization %"`) is the
/// reading. Several GPUs are averaged. Only `utilization_pct` is set; `None`
/// when no entry has a usable value.
pub fn parse_ioreg_performance(text: &str) -> Option<GpuSample> {
    let mut utilization = Mean::default();
    for line in text.lines() {
        let Some(at) = line.find("\"PerformanceStatistics\"") else {
            continue;
        };
        let rest = &line[at + "\"PerformanceStatistics\"".len()..];
        let Some(dict) = rest
            .trim_start()
            .strip_prefix('=')
            .and_then(|r| r.trim_start().strip_prefix('{'))
        else {
            continue;
        };
        let value = ioreg_number(dict, "Device Utilization %")
            .or_else(|| ioreg_number(dict, "Renderer Utilization %"))
            .filter(|v| (0.0..=100.0).contains(v));
        utilization.add(value);
    }
    let utilization_pct = utilization.get()?;
    Some(GpuSample {
        utilization_pct: Some(utilization_pct),
        freq_mhz: None,
        power_w: None,
    })
}

/// The number after `"key"=` in an inline ioreg dictionary.
fn ioreg_number(dict: &str, key: &str) -> Option<f64> {
    let quoted = format!("\"{key}\"");
    let start = dict.find(&quoted)? + quoted.len();
    let value = dict[start..].trim_start().strip_prefix('=')?.trim_start();
    let end = value.find([',', '}', ')']).unwrap_or(value.len());
    finite(value[..end].trim().parse().ok()?)
}

/// Parses the complete records in `powermetrics --samplers gpu_power -f plist`
/// output: XML plists separated by NUL bytes. A record that does not parse
/// (for instance the cut-off tail of a stream) is skipped; a record without
/// any GPU figure yields nothing.
///
/// Per record: `gpu.freq_hz` is the clock in MHz despite its name;
/// utilization is `(1 - gpu.idle_ratio) * 100`; power is `gpu.gpu_energy`,
/// else `processor.gpu_energy` (mJ over the sample) divided by `elapsed_ns`,
/// else `processor.gpu_power` (mW).
pub fn parse_powermetrics_records(bytes: &[u8]) -> Vec<GpuSample> {
    bytes
        .split(|&b| b == 0)
        .filter_map(parse_powermetrics_record)
        .map(|(sample, _elapsed)| sample)
        .collect()
}

/// Removes the complete NUL-terminated records from the front of a streaming
/// buffer and returns them without their NULs (blank ones are dropped). The
/// bytes after the last NUL, a record still being written, stay in `buffer`.
pub fn split_nul_records(buffer: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let Some(last_nul) = buffer.iter().rposition(|&b| b == 0) else {
        return Vec::new();
    };
    let complete: Vec<u8> = buffer.drain(..=last_nul).collect();
    complete
        .split(|&b| b == 0)
        .filter(|record| !record.trim_ascii().is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// One powermetrics record: the sample and the span it covers.
fn parse_powermetrics_record(record: &[u8]) -> Option<(GpuSample, Option<Duration>)> {
    let record = record.trim_ascii();
    if record.is_empty() {
        return None;
    }
    let value = Value::from_reader_xml(record).ok()?;
    let top = value.as_dictionary()?;
    let gpu = top.get("gpu").and_then(Value::as_dictionary);
    let processor = top.get("processor").and_then(Value::as_dictionary);
    let elapsed_s = number(top, "elapsed_ns")
        .filter(|ns| *ns > 0.0)
        .map(|ns| ns / 1e9);

    let freq_mhz = gpu.and_then(|g| number(g, "freq_hz")).and_then(|f| {
        // The key says Hz but the value is MHz. Should Apple ever report real
        // hertz, no GPU clock is anywhere near 100 000 MHz.
        let mhz = if f >= 100_000.0 { f / 1e6 } else { f };
        (mhz >= 0.0).then_some(mhz)
    });
    let utilization_pct = gpu
        .and_then(|g| number(g, "idle_ratio"))
        .filter(|r| (0.0..=1.0).contains(r))
        .map(|idle| (1.0 - idle) * 100.0);
    let energy_mj = gpu
        .and_then(|g| number(g, "gpu_energy"))
        .or_else(|| processor.and_then(|p| number(p, "gpu_energy")));
    let power_w = match (energy_mj, elapsed_s) {
        (Some(mj), Some(s)) => Some(mj / 1000.0 / s),
        _ => processor
            .and_then(|p| number(p, "gpu_power"))
            .map(|mw| mw / 1000.0),
    }
    .filter(|w| *w >= 0.0);

    let sample = GpuSample {
        utilization_pct,
        freq_mhz,
        power_w,
    };
    if sample.is_empty() {
        return None;
    }
    Some((
        sample,
        elapsed_s.and_then(|s| Duration::try_from_secs_f64(s).ok()),
    ))
}

/// A finite number under `key`, integer or real.
fn number(dict: &Dictionary, key: &str) -> Option<f64> {
    let value = match dict.get(key)? {
        Value::Real(r) => *r,
        Value::Integer(i) => i
            .as_signed()
            .map(|i| i as f64)
            .or_else(|| i.as_unsigned().map(|u| u as f64))?,
        _ => return None,
    };
    finite(value)
}

/// Parses `nvidia-smi --query-gpu=utilization.gpu,clocks.sm,power.draw
/// --format=csv,noheader,nounits`: one `util, clock, power` line per GPU.
///
/// Fields that are not numbers (`[N/A]`, `[Not Supported]`) are `None`.
/// Several GPUs give the mean utilization, the summed power and the highest
/// clock, each over the GPUs that report it. `None` when no line has a
/// readable field.
pub fn parse_nvidia_smi_utilization(csv: &str) -> Option<GpuSample> {
    let mut utilization = Mean::default();
    let mut power: Option<f64> = None;
    let mut clock: Option<f64> = None;
    for line in csv.lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [util, sm_clock, draw] = fields.as_slice() else {
            continue;
        };
        let percent = |s: &str| nvidia_number(s).filter(|v| (0.0..=100.0).contains(v));
        let positive = |s: &str| nvidia_number(s).filter(|v| *v >= 0.0);
        utilization.add(percent(util));
        if let Some(mhz) = positive(sm_clock) {
            clock = Some(clock.map_or(mhz, |c| c.max(mhz)));
        }
        if let Some(watts) = positive(draw) {
            power = Some(power.unwrap_or(0.0) + watts);
        }
    }
    let sample = GpuSample {
        utilization_pct: utilization.get(),
        freq_mhz: clock,
        power_w: power,
    };
    (!sample.is_empty()).then_some(sample)
}

fn nvidia_number(field: &str) -> Option<f64> {
    finite(field.parse().ok()?)
}

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
/// A `powermetrics` stream that grows this far without a NUL is not one.
const MAX_PENDING_RECORD: usize = 4 << 20;

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
            } => runtime.spawn(run_mac(weak, ioreg, powermetrics, interval)),
            Backend::NvidiaSmi { nvidia_smi } => {
                runtime.spawn(run_nvidia_smi(weak, nvidia_smi, interval))
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

    fn mac(interval: Duration) -> Backend {
        let millis = interval
            .max(MIN_INTERVAL)
            .as_millis()
            .min(u128::from(u32::MAX))
            .to_string();
        Backend::Mac {
            ioreg: CommandSpec::new("ioreg", &["-r", "-c", "IOGPU", "-d", "1"]),
            // `-n` makes sudo fail at once instead of asking for a password,
            // and a sudoers rule for powermetrics alone is enough.
            powermetrics: CommandSpec::new(
                "sudo",
                &[
                    "-n",
                    "/usr/bin/powermetrics",
                    "--samplers",
                    "gpu_power",
                    "-i",
                    &millis,
                    "-f",
                    "plist",
                ],
            ),
        }
    }

    fn nvidia_smi() -> Backend {
        Backend::NvidiaSmi {
            nvidia_smi: CommandSpec::new(
                "nvidia-smi",
                &[
                    "--query-gpu=utilization.gpu,clocks.sm,power.draw",
                    "--format=csv,noheader,nounits",
                ],
            ),
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

/// The `nvidia-smi` backend: one run per interval.
async fn run_nvidia_smi(sampler: Weak<GpuSampler>, nvidia_smi: CommandSpec, interval: Duration) {
    let mut ticker = ticker(interval);
    let mut health = Health::default();
    loop {
        ticker.tick().await;
        let result = run_capture(&nvidia_smi).await.and_then(|out| {
            parse_nvidia_smi_utilization(&out)
                .ok_or_else(|| format!("{} printed no readings", nvidia_smi.name()))
        });
        let Some(strong) = sampler.upgrade() else {
            return;
        };
        match result {
            Ok(sample) => {
                health.success();
                strong.push_from(Instant::now(), sample, SOURCE_NVIDIA_SMI);
            }
            Err(why) => {
                health.failure(why);
                if let Some(why) = &health.given_up {
                    strong.set_unavailable(format!("no GPU telemetry: {why}"));
                    return;
                }
            }
        }
    }
}

/// A running `powermetrics -f plist` child and its partial output.
struct PowermetricsChild {
    name: String,
    child: Child,
    stdout: ChildStdout,
    stderr: Option<ChildStderr>,
    pending: Vec<u8>,
    chunk: Vec<u8>,
    records: u64,
}

impl PowermetricsChild {
    fn spawn(spec: &CommandSpec) -> Result<Self, String> {
        let name = spec.name().to_owned();
        let mut child = spec.command().spawn().map_err(|e| spawn_error(&name, &e))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("{name} has no output pipe"))?;
        let stderr = child.stderr.take();
        Ok(PowermetricsChild {
            name,
            child,
            stdout,
            stderr,
            pending: Vec::new(),
            chunk: vec![0; 64 * 1024],
            records: 0,
        })
    }

    /// Takes in `n` freshly read bytes and returns the completed records'
    /// samples with the span each covers.
    fn absorb(&mut self, n: usize) -> Result<Vec<(GpuSample, Option<Duration>)>, String> {
        self.pending
            .extend_from_slice(&self.chunk[..n.min(self.chunk.len())]);
        let records = split_nul_records(&mut self.pending);
        if self.pending.len() > MAX_PENDING_RECORD {
            return Err(format!(
                "{} printed {} bytes without a record separator",
                self.name,
                self.pending.len()
            ));
        }
        self.records = self.records.saturating_add(records.len() as u64);
        Ok(records
            .iter()
            .filter_map(|r| parse_powermetrics_record(r))
            .collect())
    }

    /// Why the output ended: the child's complaint or exit status.
    async fn ended(mut self) -> String {
        let mut said = Vec::new();
        if let Some(stderr) = self.stderr.take() {
            let mut stderr = stderr.take(64 * 1024);
            let read = stderr.read_to_end(&mut said);
            // A child that closed stdout but keeps stderr open is not waited for.
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, read).await;
        }
        let status = tokio::time::timeout(COMMAND_TIMEOUT, self.child.wait()).await;
        let name = &self.name;
        let how = match status {
            Ok(Ok(status)) => format!("exited ({status})"),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(_) => "closed its output".to_owned(),
        };
        let after = if self.records == 0 {
            String::new()
        } else {
            format!(" after {} records", self.records)
        };
        match first_line(&said) {
            Some(said) => format!("{name} {how}{after}: {said}"),
            None => format!("{name} {how}{after}"),
        }
    }
}

async fn read_some(child: Option<&mut PowermetricsChild>) -> std::io::Result<usize> {
    match child {
        Some(child) => child.stdout.read(&mut child.chunk).await,
        None => std::future::pending().await,
    }
}

/// The macOS backend: `ioreg` per interval plus, when it runs, a
/// `powermetrics` stream.
async fn run_mac(
    sampler: Weak<GpuSampler>,
    ioreg: CommandSpec,
    powermetrics: CommandSpec,
    interval: Duration,
) {
    let mut ticker = ticker(interval);
    let mut ioreg_health = Health::default();
    let (mut pm, mut pm_error) = match PowermetricsChild::spawn(&powermetrics) {
        Ok(child) => (Some(child), None),
        Err(why) => (None, Some(why)),
    };
    let mut pm_error_logged = false;
    loop {
        if pm.is_none() && ioreg_health.alive() && !pm_error_logged {
            if let Some(why) = &pm_error {
                tracing::info!("GPU clock and power not sampled: {why}");
                pm_error_logged = true;
            }
        }
        if pm.is_none() && !ioreg_health.alive() {
            if let Some(sampler) = sampler.upgrade() {
                let ioreg_why = ioreg_health.given_up.as_deref().unwrap_or("stopped");
                let pm_why = pm_error.as_deref().unwrap_or("stopped");
                sampler.set_unavailable(format!("no GPU telemetry: {ioreg_why}; {pm_why}"));
            }
            return;
        }
        tokio::select! {
            _ = ticker.tick(), if ioreg_health.alive() => {
                let result = run_capture(&ioreg).await.and_then(|out| {
                    parse_ioreg_performance(&out)
                        .ok_or_else(|| format!("{} printed no GPU utilization", ioreg.name()))
                });
                let Some(strong) = sampler.upgrade() else { return };
                match result {
                    Ok(sample) => {
                        ioreg_health.success();
                        strong.push_from(Instant::now(), sample, SOURCE_IOREG);
                    }
                    Err(why) => ioreg_health.failure(why),
                }
            }
            read = read_some(pm.as_mut()) => {
                let Some(strong) = sampler.upgrade() else { return };
                let Some(mut child) = pm.take() else { continue };
                let absorbed = match read {
                    Ok(0) => Err(None),
                    Ok(n) => child.absorb(n).map_err(Some),
                    Err(e) => Err(Some(format!("{} output unreadable: {e}", child.name))),
                };
                match absorbed {
                    Ok(samples) => {
                        let now = Instant::now();
                        for (mut sample, span) in samples {
                            if ioreg_health.alive() {
                                sample.utilization_pct = None;
                            }
                            if sample.is_empty() {
                                continue;
                            }
                            // A record covers the span before it was written.
                            let at = span
                                .and_then(|s| now.checked_sub(s / 2))
                                .unwrap_or(now);
                            strong.push_from(at, sample, SOURCE_POWERMETRICS);
                        }
                        pm = Some(child);
                    }
                    Err(why) => {
                        drop(strong);
                        let why = match why {
                            Some(why) => why,
                            None => child.ended().await,
                        };
                        pm_error = Some(why);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/{name}",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpu")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn fixture_text(name: &str) -> String {
        String::from_utf8(fixture(name)).expect("fixture is UTF-8")
    }

    #[track_caller]
    fn assert_close(actual: Option<f64>, expected: f64) {
        let actual = actual.unwrap_or_else(|| panic!("expected {expected}, got None"));
        assert!(
            (actual - expected).abs() < 1e-9,
            "expected {expected}, got {actual}"
        );
    }

    fn utilization(pct: f64) -> GpuSample {
        GpuSample {
            utilization_pct: Some(pct),
            freq_mhz: None,
            power_w: None,
        }
    }

    // --- ioreg ---

    #[test]
    fn ioreg_m1_device_utilization() {
        let sample = parse_ioreg_performance(&fixture_text("ioreg-m1.txt")).expect("sample");
        assert_eq!(sample, utilization(37.0));
    }

    #[test]
    fn ioreg_m3max_device_utilization() {
        let sample = parse_ioreg_performance(&fixture_text("ioreg-m3max.txt")).expect("sample");
        assert_eq!(sample, utilization(94.0));
    }

    #[test]
    fn ioreg_falls_back_to_renderer_utilization() {
        let text = r#"    "PerformanceStatistics" = {"In use system memory"=1,"Renderer Utilization %"=35,"Tiler Utilization %"=12}"#;
        assert_eq!(parse_ioreg_performance(text), Some(utilization(35.0)));
    }

    #[test]
    fn ioreg_averages_several_gpus() {
        let text = "\"PerformanceStatistics\" = {\"Device Utilization %\"=10}\n\
                    | \"PerformanceStatistics\" = {\"Device Utilization %\" = 30 }\n";
        assert_eq!(parse_ioreg_performance(text), Some(utilization(20.0)));
    }

    #[test]
    fn ioreg_garbage_is_none() {
        for text in [
            "",
            "garbage\n\u{0}\u{1}",
            "\"PerformanceStatistics\"",
            "\"PerformanceStatistics\" = {",
            "\"PerformanceStatistics\" = {\"Device Utilization %\"=",
            "\"PerformanceStatistics\" = {\"Device Utilization %\"=abc}",
            "\"PerformanceStatistics\" = {\"Device Utilization %\"=250}",
            "\"PerformanceStatistics\" = {\"Device Utilization %\"=NaN}",
            "\"PerformanceStatistics\" = {\"Tiler Utilization %\"=3}",
            "\"Device Utilization %\"=37",
            "\"PerformanceStatistics\" = {\"Device Utilization %\"=é",
        ] {
            assert_eq!(parse_ioreg_performance(text), None, "{text:?}");
        }
    }

    // --- powermetrics ---

    #[test]
    fn powermetrics_m2_records() {
        let samples = parse_powermetrics_records(&fixture("powermetrics-m2.plist"));
        assert_eq!(samples.len(), 4, "{samples:?}");

        // Idle, at the lowest state. gpu.gpu_energy 27 mJ over 1.002917667 s.
        assert_close(samples[0].freq_mhz, 444.0);
        assert_close(samples[0].utilization_pct, 1.2346);
        assert_close(samples[0].power_w, 0.026_921_452_167_419_042);

        // Decoding: 13721 mJ over 1.000981042 s.
        assert_close(samples[1].freq_mhz, 1397.96);
        assert_close(samples[1].utilization_pct, 95.88);
        assert_close(samples[1].power_w, 13.707_552_315_461_335);

        assert_close(samples[2].freq_mhz, 1236.07);
        assert_close(samples[2].utilization_pct, 64.82);
        assert_close(samples[2].power_w, 8.022_430_315_738_843);

        // cpu_power sampler too: processor.gpu_energy 9120 mJ over
        // 1.001532958 s wins over processor.gpu_power (9106.06 mW).
        assert_close(samples[3].freq_mhz, 1338.11);
        assert_close(samples[3].utilization_pct, 88.71);
        assert_close(samples[3].power_w, 9.106_040_821_873_78);
    }

    fn record(body: &str) -> Vec<u8> {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n{body}</dict>\n</plist>\n"
        )
        .into_bytes()
    }

    /// The reference system's case 35: idle 0.25 → 75 % busy, 3000 mJ over
    /// 1.5 s → 2 W; two records average, with the peak kept.
    #[test]
    fn powermetrics_reference_vector() {
        let one = |idle: f64| {
            record(&format!(
                "<key>elapsed_ns</key><integer>1500000000</integer>\n\
                 <key>gpu</key>\n<dict>\n<key>idle_ratio</key><real>{idle}</real>\n\
                 <key>freq_hz</key><real>1398000000</real>\n\
                 <key>gpu_energy</key><integer>3000</integer>\n</dict>\n"
            ))
        };
        let samples = parse_powermetrics_records(&one(0.25));
        assert_eq!(samples.len(), 1);
        assert_close(samples[0].utilization_pct, 75.0);
        assert_close(samples[0].freq_mhz, 1398.0);
        assert_close(samples[0].power_w, 2.0);

        let mut two = one(0.25);
        two.push(0);
        two.extend(one(0.75));
        let samples = parse_powermetrics_records(&two);
        assert_eq!(samples.len(), 2);
        let sampler = GpuSampler::manual();
        let t0 = Instant::now();
        for (k, s) in samples.into_iter().enumerate() {
            sampler.push(t0 + Duration::from_secs(k as u64), s);
        }
        let window = sampler.window(t0, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(window.samples, 2);
        assert_close(window.utilization_pct, 50.0);
        assert_close(window.peak_utilization_pct, 75.0);
        assert_close(window.power_w, 2.0);
    }

    #[test]
    fn powermetrics_processor_gpu_power_in_milliwatts() {
        // No elapsed_ns: energy cannot become power, gpu_power (mW) can.
        let bytes = record(
            "<key>processor</key>\n<dict>\n<key>gpu_energy</key><integer>9120</integer>\n\
             <key>gpu_power</key><real>9106.06</real>\n</dict>\n",
        );
        let samples = parse_powermetrics_records(&bytes);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].utilization_pct, None);
        assert_eq!(samples[0].freq_mhz, None);
        assert_close(samples[0].power_w, 9.10606);
    }

    #[test]
    fn powermetrics_real_hertz_are_read_as_hertz() {
        let bytes =
            record("<key>gpu</key>\n<dict>\n<key>freq_hz</key><real>1.39822e+09</real>\n</dict>\n");
        assert_close(parse_powermetrics_records(&bytes)[0].freq_mhz, 1398.22);
    }

    #[test]
    fn powermetrics_garbage_is_empty() {
        let mut truncated = fixture("powermetrics-m2.plist");
        truncated.truncate(2000);
        for bytes in [
            &b""[..],
            b"\0\0\0",
            b"not a plist\0also not\0",
            b"<?xml version=\"1.0\"?><plist version=\"1.0\"><array/></plist>\0",
            b"<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>hw_model</key><string>Mac14,2</string></dict></plist>\0",
            b"<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>gpu</key><string>x</string></dict></plist>",
            b"<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>gpu</key><dict><key>idle_ratio</key><real>7</real><key>freq_hz</key><real>-1</real></dict></dict></plist>",
            b"\xff\xfe\x00\x01",
            &truncated,
        ] {
            assert_eq!(parse_powermetrics_records(bytes), Vec::new(), "{bytes:?}");
        }
    }

    #[test]
    fn powermetrics_skips_a_broken_record_between_good_ones() {
        let fixture = fixture("powermetrics-m2.plist");
        let mut bytes = b"<?xml garbage\0".to_vec();
        bytes.extend_from_slice(&fixture);
        // ...and the first half of another record, cut off.
        let first_end = fixture.iter().position(|&b| b == 0).expect("a NUL");
        bytes.extend_from_slice(&fixture[..first_end / 2]);
        assert_eq!(parse_powermetrics_records(&bytes).len(), 4);
    }

    // --- NUL record splitting ---

    fn split_in_chunks(bytes: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut buffer = Vec::new();
        let mut records = Vec::new();
        for piece in bytes.chunks(chunk) {
            buffer.extend_from_slice(piece);
            records.extend(split_nul_records(&mut buffer));
        }
        (records, buffer)
    }

    #[test]
    fn split_nul_records_is_independent_of_chunking() {
        let stream = fixture("powermetrics-m2.plist");
        let expected: Vec<Vec<u8>> = stream
            .split(|&b| b == 0)
            .filter(|r| !r.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(expected.len(), 4);
        for chunk in [1, 7, 4096, stream.len()] {
            let (records, rest) = split_in_chunks(&stream, chunk);
            assert_eq!(records, expected, "chunks of {chunk}");
            assert!(rest.is_empty(), "chunks of {chunk}");
            let samples: Vec<GpuSample> = records
                .iter()
                .flat_map(|r| parse_powermetrics_records(r))
                .collect();
            assert_eq!(samples, parse_powermetrics_records(&stream));
        }
    }

    #[test]
    fn split_nul_records_keeps_the_partial_tail() {
        let stream = fixture("powermetrics-m2.plist");
        let first_end = stream.iter().position(|&b| b == 0).expect("a NUL") + 1;
        let mut buffer = stream[..first_end + 100].to_vec();
        let records = split_nul_records(&mut buffer);
        assert_eq!(records, vec![stream[..first_end - 1].to_vec()]);
        assert_eq!(buffer, stream[first_end..first_end + 100].to_vec());
        assert!(split_nul_records(&mut buffer).is_empty());
        assert_eq!(buffer.len(), 100);
    }

    #[test]
    fn split_nul_records_drops_blank_records() {
        let mut buffer = b"\0\n\0a\0\0b".to_vec();
        assert_eq!(split_nul_records(&mut buffer), vec![b"a".to_vec()]);
        assert_eq!(buffer, b"b".to_vec());
        let mut empty = Vec::new();
        assert!(split_nul_records(&mut empty).is_empty());
    }

    // --- nvidia-smi ---

    #[test]
    fn nvidia_smi_one_gpu() {
        let sample = parse_nvidia_smi_utilization(&fixture_text("nvidia-smi-util-1gpu.csv"));
        assert_eq!(
            sample,
            Some(GpuSample {
                utilization_pct: Some(37.0),
                freq_mhz: Some(2520.0),
                power_w: Some(112.45),
            })
        );
    }

    #[test]
    fn nvidia_smi_two_gpus_average_sum_max() {
        let sample = parse_nvidia_smi_utilization(&fixture_text("nvidia-smi-util-2gpu.csv"))
            .expect("sample");
        assert_close(sample.utilization_pct, 54.0);
        assert_close(sample.freq_mhz, 1410.0);
        assert_close(sample.power_w, 348.92);
    }

    #[test]
    fn nvidia_smi_not_available_fields_are_none() {
        let sample = parse_nvidia_smi_utilization(&fixture_text("nvidia-smi-util-na.csv"));
        assert_eq!(
            sample,
            Some(GpuSample {
                utilization_pct: None,
                freq_mhz: Some(1755.0),
                power_w: None,
            })
        );
        // A GPU without readings does not dilute the others.
        let sample = parse_nvidia_smi_utilization("[N/A], [N/A], [N/A]\r\n40, 1500, 100.5\r\n");
        assert_eq!(
            sample,
            Some(GpuSample {
                utilization_pct: Some(40.0),
                freq_mhz: Some(1500.0),
                power_w: Some(100.5),
            })
        );
    }

    #[test]
    fn nvidia_smi_garbage_is_none() {
        for text in [
            "",
            "\n\n",
            "[N/A], [N/A], [N/A]",
            "[Not Supported], [Not Supported], [Not Supported]",
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
            "No devices were found",
            "37, 2520",
            "37, 2520, 112.45, 9",
            "utilization.gpu [%], clocks.current.sm [MHz], power.draw [W]",
            "inf, NaN, -5",
            "\u{0}\u{ff}, é, ,",
        ] {
            assert_eq!(parse_nvidia_smi_utilization(text), None, "{text:?}");
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
    async fn wait_unavailable(sampler: &GpuSampler) -> String {
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
    fn readings_from(sampler: &GpuSampler, source: &str) -> usize {
        let state = sampler.state();
        state.readings.iter().filter(|r| r.source == source).count()
    }

    /// Polls until `ready` holds, then returns a window over all readings.
    async fn wait_for_window(
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

    fn sh(script: &str) -> CommandSpec {
        CommandSpec::new("sh", &["-c", script])
    }

    fn fixture_path(name: &str) -> String {
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

    #[tokio::test]
    async fn nvidia_smi_backend_samples_and_gives_up_on_failures() {
        let backend = Backend::NvidiaSmi {
            nvidia_smi: sh(&format!(
                "cat '{}'",
                fixture_path("nvidia-smi-util-2gpu.csv")
            )),
        };
        let sampler = GpuSampler::start_backend(backend, Duration::from_millis(100));
        let window = wait_for_window(&sampler, |s| readings_from(s, SOURCE_NVIDIA_SMI) >= 2).await;
        assert_close(window.utilization_pct, 54.0);
        assert_close(window.power_w, 348.92);
        assert_eq!(window.source, "nvidia-smi");
        assert_eq!(sampler.unavailable_reason(), None);
        sampler.shutdown();

        let failing = Backend::NvidiaSmi {
            nvidia_smi: sh("echo 'No devices were found' >&2; exit 6"),
        };
        let sampler = GpuSampler::start_backend(failing, Duration::from_millis(100));
        let reason = wait_unavailable(&sampler).await;
        assert!(
            reason.starts_with("no GPU telemetry: sh failed"),
            "{reason}"
        );
        assert!(reason.ends_with("No devices were found"), "{reason}");
    }

    #[tokio::test]
    async fn mac_backend_reads_ioreg_and_a_powermetrics_stream() {
        // powermetrics prints its records, then the stream ends; ioreg goes on.
        let backend = Backend::Mac {
            ioreg: sh(&format!("cat '{}'", fixture_path("ioreg-m1.txt"))),
            powermetrics: sh(&format!("cat '{}'", fixture_path("powermetrics-m2.plist"))),
        };
        let sampler = GpuSampler::start_backend(backend, Duration::from_millis(100));
        let window = wait_for_window(&sampler, |s| {
            readings_from(s, SOURCE_POWERMETRICS) == 4 && readings_from(s, SOURCE_IOREG) >= 2
        })
        .await;
        assert_eq!(window.source, "ioreg+powermetrics");
        // Utilization comes from ioreg alone while it works.
        assert_close(window.utilization_pct, 37.0);
        assert_close(window.freq_mhz, (444.0 + 1397.96 + 1236.07 + 1338.11) / 4.0);
        assert!(window.power_w.is_some());
        assert_eq!(sampler.unavailable_reason(), None);
    }

    #[tokio::test]
    async fn mac_backend_without_anything_is_unavailable() {
        let backend = Backend::Mac {
            ioreg: CommandSpec::new("/nonexistent/ioreg", &[]),
            powermetrics: sh("echo 'sudo: a password is required' >&2; exit 1"),
        };
        let sampler = GpuSampler::start_backend(backend, Duration::from_millis(100));
        let reason = wait_unavailable(&sampler).await;
        assert!(
            reason.starts_with("no GPU telemetry: ioreg not found; sh exited"),
            "{reason}"
        );
        assert!(reason.ends_with("sudo: a password is required"), "{reason}");
    }

    /// Whether a process is still running (a zombie counts as gone).
    fn running(pid: &str) -> bool {
        std::process::Command::new("ps")
            .args(["-o", "stat=", "-p", pid])
            .output()
            .map(|out| {
                let stat = String::from_utf8_lossy(&out.stdout);
                let stat = stat.trim();
                !stat.is_empty() && !stat.starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn dropping_the_sampler_kills_the_powermetrics_child() {
        let pid_file = std::env::temp_dir().join(format!(
            "gpuscratch-powermetrics-{}.pid",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&pid_file);
        let backend = Backend::Mac {
            ioreg: sh(&format!("cat '{}'", fixture_path("ioreg-m1.txt"))),
            powermetrics: sh(&format!(
                "echo $$ > '{}.tmp' && mv '{0}.tmp' '{0}' && exec sleep 600",
                pid_file.display()
            )),
        };
        let sampler = GpuSampler::start_backend(backend, Duration::from_millis(100));
        let pid = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                    return pid.trim().to_owned();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the child starts");
        let _ = std::fs::remove_file(&pid_file);
        assert!(running(&pid));

        drop(sampler);
        tokio::time::timeout(Duration::from_secs(60), async {
            while running(&pid) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the child is killed");
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
