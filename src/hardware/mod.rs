//! What machine the daemon runs on: chip, memory, cores, GPU.
//!
//! Detection runs platform commands (`sysctl`, `ioreg`, `system_profiler` on
//! macOS; `/proc/cpuinfo`, `/proc/meminfo` (sysinfo as a fallback) and
//! `nvidia-smi` on Linux) and hands their
//! text to pure parsers, so every parser is tested on captured samples on any
//! platform. The backend is picked at run time.

pub mod apple;
pub mod linux;
pub mod macos;

use serde::{Deserialize, Serialize};

/// Which compute backend llama-server will use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Apple Silicon GPU through Metal; memory is unified with the CPU.
    Metal,
    /// An NVIDIA GPU with its own VRAM.
    Cuda,
    /// No usable GPU: the model runs on CPU threads.
    #[default]
    Cpu,
}

/// A hardware profile. `doctor --json` prints it under `hardware`, and
/// `--hardware FILE` reads the same shape back instead of detecting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hardware {
    /// "macos" or "linux".
    pub os: String,
    /// CPU architecture as the OS reports it ("arm64", "x86_64").
    pub arch: String,
    /// Marketing name of the chip, e.g. "Apple M3 Max" or the CPU model name.
    pub chip: String,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// Performance cores (all physical cores on a non-hybrid CPU).
    pub perf_cores: u32,
    /// Efficiency cores (0 when the CPU has no such cluster).
    pub efficiency_cores: u32,
    /// Logical CPUs the OS schedules on.
    pub logical_cpus: u32,
    pub accelerator: Accelerator,
    /// GPU core count on Apple Silicon; `None` where unknown or not applicable.
    pub gpu_cores: Option<u32>,
    /// GPU name ("Apple M3 Max", "NVIDIA GeForce RTX 4090").
    pub gpu_name: Option<String>,
    /// Dedicated GPU memory in bytes (NVIDIA VRAM); `None` for unified memory.
    pub gpu_memory_bytes: Option<u64>,
    /// `iogpu.wired_limit_mb` in bytes when an administrator raised or lowered
    /// the Metal wired-memory cap; `None` when macOS uses its default.
    pub gpu_wired_limit_bytes: Option<u64>,
    /// The daemon itself runs translated under Rosetta 2 (Metal is lost).
    pub rosetta: bool,
    /// Running inside a virtual machine.
    pub virtual_machine: bool,
    /// Things a person should know about this machine, one sentence each.
    pub warnings: Vec<String>,
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            chip: "unknown CPU".to_string(),
            memory_bytes: 0,
            perf_cores: 1,
            efficiency_cores: 0,
            logical_cpus: 1,
            accelerator: Accelerator::Cpu,
            gpu_cores: None,
            gpu_name: None,
            gpu_memory_bytes: None,
            gpu_wired_limit_bytes: None,
            rosetta: false,
            virtual_machine: false,
            warnings: Vec::new(),
        }
    }
}

/// Detects the hardware of this machine with the backend for the running OS.
pub fn detect() -> Hardware {
    if cfg!(target_os = "macos") {
        macos::detect()
    } else {
        linux::detect()
    }
}

/// Runs a command and returns its stdout, or `None` when it cannot run.
/// Detection treats a missing tool as "unknown", never as an error.
pub(crate) fn command_stdout(program: &str, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    // sysctl exits non-zero when one of several keys is unknown but still
    // prints the others, so keep any output.
    if text.trim().is_empty() {
        None
    } else {
        Some(text)
    }
}
