//! macOS detection: `sysctl` for CPU and memory, `ioreg` (or, failing that,
//! `system_profiler`) for the GPU core count.
//!
//! Everything but [`detect`] is a pure parser over captured text, so it is
//! tested on any OS. [`detect`] only runs commands and compiles everywhere.

use std::collections::BTreeMap;

use super::{apple, Accelerator, Hardware};

/// The sysctl keys [`detect`] asks for, in one call. Keys this macOS does not
/// know (`iogpu.wired_limit_mb` before Sonoma, `hw.perflevel*` on Intel) are
/// simply missing from the output.
const SYSCTL_KEYS: &[&str] = &[
    "machdep.cpu.brand_string",
    "hw.memsize",
    "hw.perflevel0.physicalcpu",
    "hw.perflevel1.physicalcpu",
    "hw.ncpu",
    "hw.physicalcpu",
    "iogpu.wired_limit_mb",
    "sysctl.proc_translated",
    "kern.hv_vmm_present",
    "hw.optional.arm64",
];

/// Detects this Mac's hardware. Missing tools or keys leave fields at their
/// defaults and, where it matters, add a warning.
pub fn detect() -> Hardware {
    let sysctl = super::command_stdout("sysctl", SYSCTL_KEYS).unwrap_or_default();
    let ioreg = super::command_stdout("ioreg", &["-r", "-c", "IOGPU", "-d", "1"]);
    // system_profiler takes a second or more, so only ask it when ioreg
    // did not tell us the GPU core count.
    let system_profiler = if ioreg.as_deref().and_then(parse_ioreg_gpu).is_some() {
        None
    } else {
        super::command_stdout("system_profiler", &["-json", "SPDisplaysDataType"])
    };
    hardware_from_samples(&sysctl, ioreg.as_deref(), system_profiler.as_deref())
}

/// Parses `sysctl` output into key/value pairs.
///
/// Lines look like `hw.memsize: 17179869184`; `key = value` (older and
/// BSD-style output) is accepted too. Blank lines and lines that do not start
/// with a plausible key are skipped.
pub fn parse_sysctl(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(parse_sysctl_line).collect()
}

fn parse_sysctl_line(line: &str) -> Option<(String, String)> {
    let (key, value) = line.split_once([':', '='])?;
    let key = key.trim();
    let plausible = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    plausible.then(|| (key.to_string(), value.trim().to_string()))
}

/// Reads the GPU core count and model from `ioreg -r -c IOGPU -d 1`.
///
/// Takes the first accelerator object (`+-o AGXAccelerator...`) that has a
/// `"gpu-core-count" = N` property, or failing that a `num_cores` entry in
/// its `"GPUConfigurationVariable"` dictionary; the model comes from the
/// same object's `"model"` property. `None` when no object has a count
/// (Intel Macs, empty or garbled output).
pub fn parse_ioreg_gpu(text: &str) -> Option<(u32, Option<String>)> {
    let mut object = IoregGpu::default();
    for line in text.lines() {
        if line.trim_start().starts_with("+-o") {
            if let Some(found) = object.result() {
                return Some(found);
            }
            object = IoregGpu::default();
            continue;
        }
        let Some((key, value)) = ioreg_property(line) else {
            continue;
        };
        match key {
            "gpu-core-count" => object.cores = object.cores.or(positive(value)),
            "GPUConfigurationVariable" => {
                object.configured_cores = object.configured_cores.or(num_cores(value));
            }
            "model" => {
                let model = value.trim_matches(|c| matches!(c, '"' | '<' | '>')).trim();
                if object.model.is_none() && !model.is_empty() {
                    object.model = Some(model.to_string());
                }
            }
            _ => {}
        }
    }
    object.result()
}

/// What one ioreg object said about its GPU.
#[derive(Default)]
struct IoregGpu {
    cores: Option<u32>,
    configured_cores: Option<u32>,
    model: Option<String>,
}

impl IoregGpu {
    fn result(&mut self) -> Option<(u32, Option<String>)> {
        let cores = self.cores.or(self.configured_cores)?;
        Some((cores, self.model.take()))
    }
}

/// Splits an ioreg property line, `"key" = value`, into key and value.
fn ioreg_property(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim().strip_prefix('"')?;
    let (key, rest) = rest.split_once('"')?;
    let value = rest.trim_start().strip_prefix('=')?;
    Some((key, value.trim()))
}

/// `"num_cores"=16` inside `{"num_gps"=4,...,"num_cores"=16}`.
fn num_cores(dictionary: &str) -> Option<u32> {
    let (_, rest) = dictionary.split_once("\"num_cores\"=")?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    positive(&rest[..end])
}

/// A strictly positive count; zero means "unknown" for every count here.
fn positive(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|&n| n > 0)
}

/// Reads the GPU core count and model from
/// `system_profiler -json SPDisplaysDataType`.
///
/// Apple Silicon GPUs carry `"sppci_cores": "16"` (a string) and
/// `"sppci_model": "Apple M1 Pro"`; the first entry with a core count wins.
/// `None` for invalid JSON or when no entry has one (Intel or AMD GPUs).
pub fn parse_system_profiler_gpu(json: &str) -> Option<(u32, Option<String>)> {
    use serde_json::Value;

    let root: Value = serde_json::from_str(json).ok()?;
    let displays = root.get("SPDisplaysDataType")?.as_array()?;
    displays.iter().find_map(|display| {
        let cores = match display.get("sppci_cores")? {
            Value::String(text) => positive(text),
            Value::Number(number) => number
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0),
            _ => None,
        }?;
        let model = ["sppci_model", "_name"]
            .iter()
            .filter_map(|key| display.get(*key)?.as_str())
            .map(str::trim)
            .find(|name| !name.is_empty())
            .map(str::to_string);
        Some((cores, model))
    })
}

/// Builds a [`Hardware`] profile from captured `sysctl`, `ioreg` and
/// `system_profiler` output. `ioreg` wins over `system_profiler` for the GPU.
pub fn hardware_from_samples(
    sysctl: &str,
    ioreg: Option<&str>,
    system_profiler: Option<&str>,
) -> Hardware {
    let values = parse_sysctl(sysctl);
    let text = |key: &str| {
        values
            .get(key)
            .map(|value| value.as_str())
            .filter(|value| !value.is_empty())
    };
    let number = |key: &str| text(key).and_then(|value| value.parse::<u64>().ok());
    let count = |key: &str| text(key).and_then(positive);
    let flag = |key: &str| number(key) == Some(1);

    let arm64 = flag("hw.optional.arm64");
    let rosetta = flag("sysctl.proc_translated");
    let virtual_machine = flag("kern.hv_vmm_present");

    let gpu = ioreg
        .and_then(parse_ioreg_gpu)
        .or_else(|| system_profiler.and_then(parse_system_profiler_gpu));
    let (gpu_cores, gpu_name) = match gpu {
        Some((cores, name)) => (Some(cores), name),
        None => (None, None),
    };

    // Under Rosetta some macOS versions report "VirtualApple @ 2.50GHz
    // processor" as the brand string; the GPU model names the real chip.
    let brand = text("machdep.cpu.brand_string");
    let chip = match (brand, gpu_name.as_deref()) {
        (None, Some(gpu)) if apple::classify(gpu).is_some() => gpu,
        (Some(brand), Some(gpu))
            if brand.starts_with("VirtualApple") && apple::classify(gpu).is_some() =>
        {
            gpu
        }
        (Some(brand), _) => brand,
        (None, _) => "unknown CPU",
    }
    .to_string();

    let logical = count("hw.ncpu");
    let perf_cores = count("hw.perflevel0.physicalcpu")
        .or_else(|| count("hw.physicalcpu"))
        .or(logical)
        .unwrap_or(1);
    let efficiency_cores = count("hw.perflevel1.physicalcpu").unwrap_or(0);
    let logical_cpus = logical.unwrap_or_else(|| perf_cores.saturating_add(efficiency_cores));

    let memory_bytes = number("hw.memsize").unwrap_or(0);
    let gpu_wired_limit_bytes = number("iogpu.wired_limit_mb")
        .filter(|&mb| mb > 0)
        .and_then(|mb| mb.checked_mul(1024 * 1024));
    let accelerator = if arm64 {
        Accelerator::Metal
    } else {
        Accelerator::Cpu
    };

    let mut warnings = Vec::new();
    if rosetta {
        warnings.push(
            "contextpilotd is running under Rosetta 2 (x86_64 translation): llama-server would \
             lose Metal and run several times slower on the CPU; reinstall and run the arm64 \
             build of contextpilotd and llama-server."
                .to_string(),
        );
    }
    if virtual_machine {
        warnings.push(
            "This Mac is a virtual machine: Metal performance may be limited, and memory and \
             core counts are what the VM was given, not the host's."
                .to_string(),
        );
    }
    if accelerator == Accelerator::Metal && gpu_cores.is_none() {
        warnings.push(
            "The GPU core count is unknown (neither ioreg nor system_profiler reported it), so \
             memory-bandwidth estimates assume the smallest GPU of this chip."
                .to_string(),
        );
    }
    if memory_bytes == 0 {
        warnings.push(
            "Physical memory is unknown (sysctl did not report hw.memsize), so memory-based \
             sizing cannot be trusted."
                .to_string(),
        );
    }

    Hardware {
        os: "macos".to_string(),
        arch: if arm64 { "arm64" } else { "x86_64" }.to_string(),
        chip,
        memory_bytes,
        perf_cores,
        efficiency_cores,
        logical_cpus,
        accelerator,
        gpu_cores,
        gpu_name,
        gpu_memory_bytes: None,
        gpu_wired_limit_bytes,
        rosetta,
        virtual_machine,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_path(name: &str) -> String {
        format!(
            "{}/tests/fixtures/hardware/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    fn fixture(name: &str) -> String {
        let path = fixture_path(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    /// Compares with `<name>.expected.json`; with `BLESS_HARDWARE_FIXTURES=1`
    /// in the environment, (re)writes that file instead.
    fn check_expected(name: &str, actual: &Hardware) {
        let path = fixture_path(&format!("{name}.expected.json"));
        let json = serde_json::to_string_pretty(actual).unwrap() + "\n";
        if std::env::var_os("BLESS_HARDWARE_FIXTURES").is_some() {
            std::fs::write(&path, &json).unwrap();
            return;
        }
        let expected: Hardware = serde_json::from_str(&fixture(&format!("{name}.expected.json")))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(actual, &expected, "{name}: got\n{json}");
    }

    struct Case {
        name: &'static str,
        ioreg: bool,
        system_profiler: bool,
    }

    const CASES: &[Case] = &[
        Case {
            name: "macos-m1-8gb",
            ioreg: true,
            system_profiler: false,
        },
        Case {
            name: "macos-m2pro-16gb",
            ioreg: false,
            system_profiler: true,
        },
        Case {
            name: "macos-m3max-128gb",
            ioreg: true,
            system_profiler: false,
        },
        Case {
            name: "macos-m4max-64gb",
            ioreg: true,
            system_profiler: false,
        },
        Case {
            name: "macos-rosetta",
            ioreg: false,
            system_profiler: false,
        },
    ];

    #[test]
    fn fixtures_match_expected_json() {
        for case in CASES {
            let sysctl = fixture(&format!("{}.sysctl.txt", case.name));
            let ioreg = case
                .ioreg
                .then(|| fixture(&format!("{}.ioreg.txt", case.name)));
            let profiler = case
                .system_profiler
                .then(|| fixture(&format!("{}.system_profiler.json", case.name)));
            let hardware = hardware_from_samples(&sysctl, ioreg.as_deref(), profiler.as_deref());
            check_expected(case.name, &hardware);
        }
    }

    #[test]
    fn fixture_spot_checks() {
        let m4 = hardware_from_samples(
            &fixture("macos-m4max-64gb.sysctl.txt"),
            Some(&fixture("macos-m4max-64gb.ioreg.txt")),
            None,
        );
        assert_eq!(m4.gpu_wired_limit_bytes, Some(57344 * 1024 * 1024));
        assert_eq!((m4.perf_cores, m4.efficiency_cores), (12, 4));
        assert_eq!(m4.gpu_cores, Some(40));
        assert_eq!(
            apple::memory_bandwidth_gbs(&m4.chip, m4.gpu_cores),
            Some(546.0)
        );
        assert!(m4.warnings.is_empty(), "{:?}", m4.warnings);

        let m3 = hardware_from_samples(
            &fixture("macos-m3max-128gb.sysctl.txt"),
            Some(&fixture("macos-m3max-128gb.ioreg.txt")),
            None,
        );
        assert_eq!(
            m3.gpu_wired_limit_bytes, None,
            "wired_limit_mb 0 is the default"
        );
        assert_eq!(m3.memory_bytes, 128 << 30);

        let m2 = hardware_from_samples(
            &fixture("macos-m2pro-16gb.sysctl.txt"),
            None,
            Some(&fixture("macos-m2pro-16gb.system_profiler.json")),
        );
        assert_eq!(m2.gpu_cores, Some(19));
        assert_eq!(m2.gpu_name.as_deref(), Some("Apple M2 Pro"));
    }

    #[test]
    fn rosetta_warns_loudly() {
        let hardware = hardware_from_samples(&fixture("macos-rosetta.sysctl.txt"), None, None);
        assert!(hardware.rosetta);
        let first = hardware.warnings.first().expect("a warning");
        assert!(first.contains("Rosetta 2"), "{first}");
        assert!(first.contains("arm64 build"), "{first}");
        assert!(first.contains("Metal"), "{first}");
    }

    #[test]
    fn rosetta_brand_string_is_replaced_by_gpu_model() {
        let hardware = hardware_from_samples(
            &fixture("macos-rosetta.sysctl.txt"),
            Some("+-o AGXAcceleratorG13X\n  {\n    \"gpu-core-count\" = 16\n    \"model\" = \"Apple M1 Pro\"\n  }\n"),
            None,
        );
        assert_eq!(hardware.chip, "Apple M1 Pro");
        assert_eq!(hardware.gpu_cores, Some(16));
    }

    #[test]
    fn virtual_machine_and_unknown_gpu_warn() {
        let sysctl = "machdep.cpu.brand_string: Apple M1 (Virtual)\nhw.memsize: 8589934592\n\
                      hw.ncpu: 4\nkern.hv_vmm_present: 1\nhw.optional.arm64: 1\n";
        let hardware = hardware_from_samples(sysctl, Some(""), Some("{}"));
        assert!(hardware.virtual_machine);
        assert_eq!(hardware.accelerator, Accelerator::Metal);
        assert_eq!((hardware.perf_cores, hardware.efficiency_cores), (4, 0));
        assert_eq!(hardware.logical_cpus, 4);
        assert_eq!(hardware.warnings.len(), 2, "{:?}", hardware.warnings);
        assert!(hardware.warnings[0].contains("virtual machine"));
        assert!(hardware.warnings[1].contains("GPU core count is unknown"));
    }

    #[test]
    fn intel_mac_uses_physical_cores() {
        let sysctl = "machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\n\
                      hw.memsize: 34359738368\nhw.ncpu: 16\nhw.physicalcpu: 8\n\
                      sysctl: unknown oid 'hw.perflevel0.physicalcpu'\n";
        let hardware = hardware_from_samples(sysctl, None, None);
        assert_eq!(hardware.arch, "x86_64");
        assert_eq!(hardware.accelerator, Accelerator::Cpu);
        assert_eq!((hardware.perf_cores, hardware.logical_cpus), (8, 16));
        assert!(hardware.warnings.is_empty(), "{:?}", hardware.warnings);
    }

    #[test]
    fn garbage_and_empty_input_give_defaults() {
        let inputs = [
            "",
            "\n\n   \n",
            "not sysctl output at all\n\u{0}\u{fffd}: ::: ===",
            "hw.memsize: lots\nhw.ncpu: -4\nhw.perflevel0.physicalcpu: 99999999999999\n\
             iogpu.wired_limit_mb: 99999999999999999\nhw.optional.arm64: yes\n",
        ];
        for input in inputs {
            let hardware = hardware_from_samples(input, Some(input), Some(input));
            assert_eq!(hardware.os, "macos");
            assert_eq!(hardware.arch, "x86_64");
            assert_eq!(hardware.chip, "unknown CPU");
            assert_eq!(hardware.memory_bytes, 0);
            assert_eq!(hardware.perf_cores, 1);
            assert_eq!(hardware.logical_cpus, 1);
            assert_eq!(hardware.accelerator, Accelerator::Cpu);
            assert_eq!(hardware.gpu_cores, None);
            assert!(!hardware.rosetta && !hardware.virtual_machine);
            assert_eq!(
                hardware.warnings.len(),
                1,
                "{input:?}: {:?}",
                hardware.warnings
            );
        }
        // A huge wired limit overflows u64 bytes: dropped, not wrapped.
        let huge = hardware_from_samples("iogpu.wired_limit_mb: 18446744073709551615", None, None);
        assert_eq!(huge.gpu_wired_limit_bytes, None);
    }

    #[test]
    fn sysctl_lines() {
        let map = parse_sysctl(
            "hw.memsize: 17179869184\nkern.ostype = Darwin\n\n  garbage line\n\
             machdep.cpu.brand_string: Apple M1: special\nbad key: 1\n: empty\n",
        );
        assert_eq!(
            map.get("hw.memsize").map(String::as_str),
            Some("17179869184")
        );
        assert_eq!(map.get("kern.ostype").map(String::as_str), Some("Darwin"));
        assert_eq!(
            map.get("machdep.cpu.brand_string").map(String::as_str),
            Some("Apple M1: special")
        );
        assert_eq!(map.len(), 3, "{map:?}");
    }

    #[test]
    fn ioreg_variants() {
        assert_eq!(
            parse_ioreg_gpu(&fixture("macos-m1-8gb.ioreg.txt")),
            Some((8, Some("Apple M1".to_string())))
        );
        // Only the configuration dictionary: still a count.
        let config = "+-o AGXAcceleratorG14G\n  {\n    \"GPUConfigurationVariable\" = \
                      {\"num_gps\"=2,\"num_cores\"=10}\n  }\n";
        assert_eq!(parse_ioreg_gpu(config), Some((10, None)));
        // The first object without a count is skipped; model is per object.
        let two = "+-o IntelAccelerator\n  {\n    \"model\" = <\"Intel Iris\">\n  }\n\
                   +-o AMDRadeonX6000\n  {\n    \"gpu-core-count\" = 40\n  }\n";
        assert_eq!(parse_ioreg_gpu(two), Some((40, None)));
        for bad in [
            "",
            "+-o",
            "\"gpu-core-count\" = 0",
            "\"gpu-core-count\" = many",
        ] {
            assert_eq!(parse_ioreg_gpu(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn system_profiler_variants() {
        let number = r#"{"SPDisplaysDataType":[{"sppci_cores":16,"_name":"Apple M1 Pro"}]}"#;
        assert_eq!(
            parse_system_profiler_gpu(number),
            Some((16, Some("Apple M1 Pro".to_string())))
        );
        let intel = r#"{"SPDisplaysDataType":[{"sppci_model":"Intel UHD Graphics 630"},
                        {"sppci_model":"AMD Radeon Pro 5500M","sppci_cores":"x"}]}"#;
        assert_eq!(parse_system_profiler_gpu(intel), None);
        for bad in ["", "{", "[]", "{}", r#"{"SPDisplaysDataType":{}}"#] {
            assert_eq!(parse_system_profiler_gpu(bad), None, "{bad:?}");
        }
    }
}
