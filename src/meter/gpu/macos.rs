//! The macOS source: `ioreg` every interval for the utilization, and one
//! long-running `powermetrics` child (through `sudo -n`) for clock and
//! power, its NUL-separated plist records read as they arrive. The
//! parsers are pure functions over captured output; everything here
//! compiles and is tested on any OS.

use std::sync::Weak;
use std::time::{Duration, Instant};

use plist::{Dictionary, Value};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdout};

use super::{
    finite, first_line, run_capture, spawn_error, ticker, Backend, CommandSpec, GpuSample,
    GpuSampler, Health, Mean, COMMAND_TIMEOUT, MIN_INTERVAL, SOURCE_IOREG, SOURCE_POWERMETRICS,
};

/// A `powermetrics` stream that grows this far without a NUL is not one.
const MAX_PENDING_RECORD: usize = 4 << 20;

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

impl Backend {
    pub(super) fn mac(interval: Duration) -> Backend {
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
pub(super) async fn run_mac(
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
    use crate::meter::gpu::tests::{
        assert_close, fixture, fixture_path, fixture_text, readings_from, sh, utilization,
        wait_for_window, wait_unavailable,
    };

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
}
