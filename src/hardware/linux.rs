//! Linux detection: `/proc/cpuinfo`, `/proc/meminfo` and `nvidia-smi`.
//!
//! Everything but [`detect`] is a pure parser over captured text, so it is
//! tested on any OS.

use std::collections::BTreeSet;

use super::{Accelerator, Hardware};

/// Detects this machine's hardware. Unreadable files and a missing
/// `nvidia-smi` (the normal case without an NVIDIA GPU) leave fields at their
/// defaults.
pub fn detect() -> Hardware {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let nvidia_smi = super::command_stdout(
        "nvidia-smi",
        &[
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ],
    );
    let mut hw = hardware_from_samples(&cpuinfo, &meminfo, nvidia_smi.as_deref());
    // Containers and unusual kernels can hide /proc files; sysinfo has other
    // sources for the two numbers the planner cannot do without.
    if hw.memory_bytes == 0 || hw.logical_cpus == 0 {
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        if hw.memory_bytes == 0 && system.total_memory() > 0 {
            hw.memory_bytes = system.total_memory();
            hw.warnings
                .retain(|w| !w.starts_with("Physical memory is unknown"));
        }
        if hw.logical_cpus == 0 {
            let cores = sysinfo::System::physical_core_count().unwrap_or(1).max(1) as u32;
            hw.logical_cpus = cores;
            hw.perf_cores = cores;
        }
    }
    hw
}

/// What `/proc/cpuinfo` says about the CPU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuInfo {
    /// `model name` on x86; on ARM, the `Hardware` or `Model` line or a name
    /// derived from `CPU part`. `None` when nothing names the CPU.
    pub model_name: Option<String>,
    /// Distinct (`physical id`, `core id`) pairs, or `logical_cpus` when the
    /// kernel does not list them (many VMs, ARM).
    pub physical_cores: u32,
    /// Number of `processor` entries; 0 when the text lists none.
    pub logical_cpus: u32,
    /// The `hypervisor` CPU flag: the kernel runs in a virtual machine.
    pub hypervisor: bool,
}

/// Parses `/proc/cpuinfo`.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut logical: u32 = 0;
    let mut cores = BTreeSet::new();
    let mut physical_id: Option<&str> = None;
    let mut core_id: Option<&str> = None;
    let mut model_name = None;
    let mut hardware = None;
    let mut board = None;
    let mut part = None;
    let mut hypervisor = false;

    for (key, value) in text.lines().filter_map(cpuinfo_field) {
        match key {
            // Old 32-bit ARM kernels also print a "Processor : ARMv7 ..."
            // line once; only numbered lowercase entries are CPUs.
            "processor" if value.parse::<u32>().is_ok() => {
                if let (Some(physical), Some(core)) = (physical_id.take(), core_id.take()) {
                    cores.insert((physical, core));
                }
                logical = logical.saturating_add(1);
            }
            "physical id" => physical_id = Some(value),
            "core id" => core_id = Some(value),
            "model name" => set_once(&mut model_name, value),
            "Hardware" => set_once(&mut hardware, value),
            "Model" => set_once(&mut board, value),
            "CPU part" => set_once(&mut part, value),
            "flags" => hypervisor |= value.split_whitespace().any(|flag| flag == "hypervisor"),
            _ => {}
        }
    }
    if let (Some(physical), Some(core)) = (physical_id, core_id) {
        cores.insert((physical, core));
    }

    let physical_cores = match u32::try_from(cores.len()) {
        Ok(n) if n > 0 && logical > 0 => n.min(logical),
        _ => logical,
    };
    let model_name = model_name
        .or(hardware)
        .or(board)
        .map(str::to_string)
        .or_else(|| part.map(arm_part_name));
    CpuInfo {
        model_name,
        physical_cores,
        logical_cpus: logical,
        hypervisor,
    }
}

/// Splits a cpuinfo line `key\t: value` into trimmed key and value.
fn cpuinfo_field(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once(':')?;
    Some((key.trim(), value.trim()))
}

fn set_once<'a>(slot: &mut Option<&'a str>, value: &'a str) {
    if slot.is_none() && !value.is_empty() {
        *slot = Some(value);
    }
}

/// A readable name for an ARM `CPU part` number; the raw number otherwise.
fn arm_part_name(part: &str) -> String {
    let name = match part.to_ascii_lowercase().as_str() {
        "0xd03" => "ARM Cortex-A53",
        "0xd05" => "ARM Cortex-A55",
        "0xd07" => "ARM Cortex-A57",
        "0xd08" => "ARM Cortex-A72",
        "0xd0b" => "ARM Cortex-A76",
        "0xd0c" => "ARM Neoverse-N1",
        "0xd40" => "ARM Neoverse-V1",
        "0xd49" => "ARM Neoverse-N2",
        "0xd4f" => "ARM Neoverse-V2",
        "0xd84" => "ARM Neoverse-V3",
        _ => return format!("ARM CPU part {part}"),
    };
    name.to_string()
}

/// `MemTotal` from `/proc/meminfo`, in bytes (the file counts kB).
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix("MemTotal:")?.trim();
        let kib = value.strip_suffix("kB").unwrap_or(value).trim();
        kib.parse::<u64>().ok()?.checked_mul(1024)
    })
}

/// One GPU as `nvidia-smi` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvidiaGpu {
    /// "NVIDIA GeForce RTX 4090".
    pub name: String,
    /// Dedicated memory in bytes; 0 when nvidia-smi reports `[N/A]` (GPUs
    /// that share system memory, such as the GB10).
    pub memory_bytes: u64,
}

/// Parses `nvidia-smi --query-gpu=name,memory.total
/// --format=csv,noheader,nounits`: one `name, MiB` line per GPU.
///
/// Lines that are not GPUs (the "NVIDIA-SMI has failed" message nvidia-smi
/// prints on stdout when the driver is not loaded, "No devices were found")
/// are skipped.
pub fn parse_nvidia_smi(csv: &str) -> Vec<NvidiaGpu> {
    csv.lines()
        .filter_map(|line| {
            let (name, memory) = line.rsplit_once(',')?;
            let name = name.trim();
            let memory = memory.trim();
            if name.is_empty() || name.contains("NVIDIA-SMI") {
                return None;
            }
            let memory_bytes = if memory.starts_with('[') || memory == "N/A" {
                0
            } else {
                memory.parse::<u64>().ok()?.checked_mul(1024 * 1024)?
            };
            Some(NvidiaGpu {
                name: name.to_string(),
                memory_bytes,
            })
        })
        .collect()
}

/// Builds a [`Hardware`] profile from captured `/proc/cpuinfo`,
/// `/proc/meminfo` and `nvidia-smi` output.
///
/// The architecture comes from the cpuinfo text itself (never from the
/// running binary), so the result depends only on the inputs.
pub fn hardware_from_samples(cpuinfo: &str, meminfo: &str, nvidia_smi: Option<&str>) -> Hardware {
    let cpu = parse_cpuinfo(cpuinfo);
    let memory_bytes = parse_meminfo_total(meminfo).unwrap_or(0);
    let gpus = nvidia_smi.map(parse_nvidia_smi).unwrap_or_default();
    // The largest GPU; the first one among equals.
    let gpu = gpus.iter().reduce(|best, gpu| {
        if gpu.memory_bytes > best.memory_bytes {
            gpu
        } else {
            best
        }
    });

    let perf_cores = cpu.physical_cores.max(1);
    let logical_cpus = cpu.logical_cpus.max(perf_cores);

    let mut warnings = Vec::new();
    if cpu.hypervisor {
        warnings.push(
            "This machine is a virtual machine (the CPU reports the hypervisor flag): core \
             counts and memory are what the VM was given, and other guests may compete for them."
                .to_string(),
        );
    }
    match gpu {
        None => warnings.push(format!(
            "No GPU found (nvidia-smi listed none): llama-server runs on {perf_cores} CPU \
             thread{}, so expect slow prompt processing.",
            if perf_cores == 1 { "" } else { "s" }
        )),
        Some(gpu) => {
            if gpus.len() > 1 {
                warnings.push(format!(
                    "{} NVIDIA GPUs found: sizing for the largest, {}.",
                    gpus.len(),
                    gpu.name
                ));
            }
            if gpu.memory_bytes == 0 {
                warnings.push(format!(
                    "nvidia-smi did not report memory for {}: treating it as sharing system \
                     memory.",
                    gpu.name
                ));
            }
        }
    }
    if memory_bytes == 0 {
        warnings.push(
            "Physical memory is unknown (/proc/meminfo had no MemTotal), so memory-based sizing \
             cannot be trusted."
                .to_string(),
        );
    }

    Hardware {
        os: "linux".to_string(),
        arch: cpuinfo_arch(cpuinfo).to_string(),
        chip: cpu.model_name.unwrap_or_else(|| "unknown CPU".to_string()),
        memory_bytes,
        perf_cores,
        efficiency_cores: 0,
        logical_cpus,
        accelerator: if gpu.is_some() {
            Accelerator::Cuda
        } else {
            Accelerator::Cpu
        },
        gpu_cores: None,
        gpu_name: gpu.map(|gpu| gpu.name.clone()),
        gpu_memory_bytes: gpu.map(|gpu| gpu.memory_bytes).filter(|&bytes| bytes > 0),
        gpu_wired_limit_bytes: None,
        rosetta: false,
        virtual_machine: cpu.hypervisor,
        warnings,
    }
}

/// "x86_64" when cpuinfo has x86 fields, "aarch64" when it has ARM ones,
/// "unknown" otherwise.
fn cpuinfo_arch(cpuinfo: &str) -> &'static str {
    let mut keys = cpuinfo
        .lines()
        .filter_map(cpuinfo_field)
        .map(|(key, _)| key);
    match keys.find(|key| matches!(*key, "vendor_id" | "flags" | "CPU implementer")) {
        Some("CPU implementer") => "aarch64",
        Some(_) => "x86_64",
        None => "unknown",
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

    /// Fixture name and whether it has an nvidia-smi capture.
    const CASES: &[(&str, bool)] = &[("linux-2core", false), ("linux-nvidia", true)];

    #[test]
    fn fixtures_match_expected_json() {
        for &(name, nvidia) in CASES {
            let cpuinfo = fixture(&format!("{name}.cpuinfo.txt"));
            let meminfo = fixture(&format!("{name}.meminfo.txt"));
            let smi = nvidia.then(|| fixture(&format!("{name}.nvidia-smi.csv")));
            let hardware = hardware_from_samples(&cpuinfo, &meminfo, smi.as_deref());
            check_expected(name, &hardware);
        }
    }

    #[test]
    fn fixture_spot_checks() {
        let vm = parse_cpuinfo(&fixture("linux-2core.cpuinfo.txt"));
        assert_eq!(
            (vm.physical_cores, vm.logical_cpus, vm.hypervisor),
            (2, 2, true)
        );

        let ryzen = parse_cpuinfo(&fixture("linux-nvidia.cpuinfo.txt"));
        assert_eq!((ryzen.physical_cores, ryzen.logical_cpus), (8, 16));
        assert!(!ryzen.hypervisor);
        assert_eq!(
            ryzen.model_name.as_deref(),
            Some("AMD Ryzen 7 7700X 8-Core Processor")
        );

        let hardware = hardware_from_samples(
            &fixture("linux-nvidia.cpuinfo.txt"),
            &fixture("linux-nvidia.meminfo.txt"),
            Some(&fixture("linux-nvidia.nvidia-smi.csv")),
        );
        assert_eq!(hardware.accelerator, Accelerator::Cuda);
        assert_eq!(hardware.gpu_memory_bytes, Some(24564 * 1024 * 1024));
        assert_eq!(hardware.memory_bytes, 65776356 * 1024);
        assert!(hardware.warnings.is_empty(), "{:?}", hardware.warnings);
    }

    #[test]
    fn cpuinfo_without_topology_counts_logical() {
        let text = "processor\t: 0\nmodel name\t: QEMU Virtual CPU version 2.5+\nflags\t: fpu hypervisor\n\n\
                    processor\t: 1\nmodel name\t: QEMU Virtual CPU version 2.5+\nflags\t: fpu hypervisor\n";
        let cpu = parse_cpuinfo(text);
        assert_eq!((cpu.physical_cores, cpu.logical_cpus), (2, 2));
        assert!(cpu.hypervisor);
        assert_eq!(cpuinfo_arch(text), "x86_64");
    }

    #[test]
    fn aarch64_cpuinfo() {
        let graviton = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes\n\
                        CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\n\
                        CPU part\t: 0xd0c\nCPU revision\t: 1\n\n\
                        processor\t: 1\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes\n\
                        CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\n\
                        CPU part\t: 0xd0c\nCPU revision\t: 1\n";
        let cpu = parse_cpuinfo(graviton);
        assert_eq!(cpu.model_name.as_deref(), Some("ARM Neoverse-N1"));
        assert_eq!((cpu.physical_cores, cpu.logical_cpus), (2, 2));
        let hardware = hardware_from_samples(graviton, "MemTotal: 8000000 kB\n", None);
        assert_eq!(hardware.arch, "aarch64");
        assert!(!hardware.virtual_machine);

        let pi = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\n\
                  Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n";
        assert_eq!(parse_cpuinfo(pi).model_name.as_deref(), Some("BCM2835"));
        let unknown = "processor\t: 0\nCPU implementer\t: 0x61\nCPU part\t: 0x039\n";
        assert_eq!(
            parse_cpuinfo(unknown).model_name.as_deref(),
            Some("ARM CPU part 0x039")
        );
        let old_arm = "Processor\t: ARMv7 Processor rev 4 (v7l)\nprocessor\t: 0\nprocessor\t: 1\n";
        assert_eq!(parse_cpuinfo(old_arm).logical_cpus, 2);
    }

    #[test]
    fn meminfo_total() {
        assert_eq!(
            parse_meminfo_total("MemFree: 1 kB\nMemTotal:       24684096 kB\n"),
            Some(24684096 * 1024)
        );
        assert_eq!(parse_meminfo_total("MemTotal: 1024\n"), Some(1024 * 1024));
        for bad in [
            "",
            "MemTotal:",
            "MemTotal: lots kB",
            "MemTotal: 99999999999999999999 kB",
        ] {
            assert_eq!(parse_meminfo_total(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn nvidia_smi_lines() {
        let two = "NVIDIA GeForce RTX 3060, 12288\nNVIDIA RTX A6000, 49140\n";
        let gpus = parse_nvidia_smi(two);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].memory_bytes, 49140 * 1024 * 1024);
        let hardware = hardware_from_samples("", "MemTotal: 1 kB", Some(two));
        assert_eq!(hardware.gpu_name.as_deref(), Some("NVIDIA RTX A6000"));
        assert!(hardware.warnings[0].starts_with("2 NVIDIA GPUs found"));

        let failed = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA \
                      driver. Make sure that the latest NVIDIA driver is installed and running.\n";
        assert!(parse_nvidia_smi(failed).is_empty());
        assert!(parse_nvidia_smi("No devices were found\n").is_empty());
        assert!(parse_nvidia_smi(", 1024\nGPU, lots\n").is_empty());

        let unified = parse_nvidia_smi("NVIDIA GB10, [N/A]\n");
        assert_eq!(unified[0].memory_bytes, 0);
        let hardware = hardware_from_samples("", "MemTotal: 1 kB", Some("NVIDIA GB10, [N/A]\n"));
        assert_eq!(hardware.accelerator, Accelerator::Cuda);
        assert_eq!(hardware.gpu_memory_bytes, None);
    }

    #[test]
    fn no_gpu_warns_with_thread_count() {
        let hardware = hardware_from_samples(
            &fixture("linux-2core.cpuinfo.txt"),
            &fixture("linux-2core.meminfo.txt"),
            None,
        );
        assert_eq!(hardware.accelerator, Accelerator::Cpu);
        assert!(hardware
            .warnings
            .iter()
            .any(|w| w.starts_with("No GPU found") && w.contains("2 CPU threads")));
    }

    #[test]
    fn garbage_and_empty_input_give_defaults() {
        let inputs = [
            "",
            "\n\n",
            "\u{0}garbage: \u{fffd}\n:::\nprocessor: x\ncore id: 3",
        ];
        for input in inputs {
            let hardware = hardware_from_samples(input, input, Some(input));
            assert_eq!(hardware.os, "linux");
            assert_eq!(hardware.arch, "unknown");
            assert_eq!(hardware.chip, "unknown CPU");
            assert_eq!(hardware.memory_bytes, 0);
            assert_eq!((hardware.perf_cores, hardware.logical_cpus), (1, 1));
            assert_eq!(hardware.accelerator, Accelerator::Cpu);
            assert_eq!(
                hardware.warnings.len(),
                2,
                "{input:?}: {:?}",
                hardware.warnings
            );
        }
    }
}
