//! The `nvidia-smi` source, used everywhere but macOS: one
//! `nvidia-smi --query-gpu=...` run per interval. The parser is a pure
//! function over captured output, tested on any OS.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::{
    finite, run_capture, ticker, Backend, CommandSpec, GpuSample, GpuSampler, Health, Mean,
    SOURCE_NVIDIA_SMI,
};

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

impl Backend {
    pub(super) fn nvidia_smi() -> Backend {
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

/// The `nvidia-smi` backend: one run per interval.
pub(super) async fn run_nvidia_smi(
    sampler: Weak<GpuSampler>,
    nvidia_smi: CommandSpec,
    interval: Duration,
) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::gpu::tests::{
        assert_close, fixture_path, fixture_text, readings_from, sh, wait_for_window,
        wait_unavailable,
    };

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
}
