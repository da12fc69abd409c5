//! The cost model: how many milliseconds a prompt costs on this machine,
//! measured, so that slot choice, reordering and llama-server's flags are
//! judged in time rather than in cached tokens.
//!
//! A [`CostProfile`] holds what [`tune`] measured against a running child:
//! prefill time at a few prompt lengths (fitted to `fixed + per_token × n`),
//! the time of an exact prefix hit, and, when the child has llama-server's
//! host-RAM prompt cache, what saving a slot's prompt there and restoring it
//! cost against recomputing it. Profiles are cached as JSON in
//! `<cache>/cost/<key>.json`, keyed by the llama-server binary, the model
//! file, the hardware and the flags that change speed, so a restart does not
//! measure again. `[cost] profile` names a file in the same format instead
//! (figures from elsewhere, or a test's).
//!
//! [`CostModel`] is the daemon's live copy: the profile (replaced when a
//! measurement lands) and a calibration of the daemon's token estimates
//! against llama-server's own counts. The slot table asks it for
//! predictions; the request's settle stage tells it what really happened.

pub mod tune;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::hardware::Hardware;

/// Version of the profile file format; a file of another version is ignored.
pub const PROFILE_VERSION: u32 = 1;

/// Saving a prompt to llama-server's RAM cache and restoring it must cost at
/// most this share of recomputing it for the tier to stay on.
pub const RAM_RESTORE_MAX_SHARE: f64 = 0.5;

/// One measured prefill: a cold prompt of `tokens` took `ms` (llama-server's
/// `timings.prompt_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoint {
    pub tokens: u64,
    pub ms: f64,
}

/// What llama-server's host-RAM prompt cache cost, measured on a prompt of
/// `tokens` (wall-clock milliseconds of whole requests).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RamCost {
    pub tokens: u64,
    /// The same prompt computed from nothing.
    pub recompute_ms: f64,
    /// Restoring it from the RAM cache into a slot that held something else.
    pub restore_ms: f64,
    /// What saving a slot's prompt added to the request that replaced it.
    pub save_ms: f64,
}

impl RamCost {
    /// Whether the tier saves time: a round trip (the save every replaced
    /// prompt pays, then the restore) must cost at most half a recompute.
    pub fn pays(&self) -> bool {
        self.restore_ms + self.save_ms <= RAM_RESTORE_MAX_SHARE * self.recompute_ms
    }
}

/// Where a profile's figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Measured on this machine by `tune`.
    Measured,
    /// Read from `[cost] profile`.
    Configured,
    /// Nothing measured yet: rough figures that only rank choices.
    Default,
}

/// The measured costs of one llama-server, model and machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostProfile {
    #[serde(default = "profile_version")]
    pub version: u32,
    #[serde(default = "default_source")]
    pub source: Source,
    /// The cache key it was measured for (see [`profile_key`]).
    #[serde(default)]
    pub key: String,
    /// RFC 3339 UTC time of the measurement.
    #[serde(default)]
    pub measured_at: Option<String>,
    /// llama-server's `/props.build_info`.
    #[serde(default)]
    pub build_info: Option<String>,
    /// The cold prefills measured, shortest first.
    #[serde(default)]
    pub prefill: Vec<PrefillPoint>,
    pub prefill_fixed_ms: f64,
    pub prefill_ms_per_token: f64,
    /// An exact prefix hit (one token evaluated).
    pub hit_ms: f64,
    /// `None`: the child had no RAM cache when it was measured.
    #[serde(default)]
    pub ram: Option<RamCost>,
    /// How long the measurement took.
    #[serde(default)]
    pub took_ms: f64,
}

fn profile_version() -> u32 {
    PROFILE_VERSION
}

fn default_source() -> Source {
    Source::Configured
}

impl CostProfile {
    /// Rough figures for a machine not measured yet: only their ratios
    /// matter until a measurement replaces them.
    pub fn fallback(hw: &Hardware) -> CostProfile {
        let per_token = match hw.accelerator {
            crate::hardware::Accelerator::Cpu => 8.0,
            _ => 0.2,
        };
        CostProfile::unmeasured(10.0 * per_token, per_token, 10.0 * per_token)
    }

    /// A profile of given figures that nothing measured.
    pub fn unmeasured(fixed_ms: f64, per_token_ms: f64, hit_ms: f64) -> CostProfile {
        CostProfile {
            version: PROFILE_VERSION,
            source: Source::Default,
            key: String::new(),
            measured_at: None,
            build_info: None,
            prefill: Vec::new(),
            prefill_fixed_ms: fixed_ms,
            prefill_ms_per_token: per_token_ms,
            hit_ms,
            ram: None,
            took_ms: 0.0,
        }
    }

    /// Predicted prompt time when `computed` tokens must be evaluated (at
    /// least one always is: llama.cpp recomputes the last prompt token).
    pub fn prefill_ms(&self, computed: u64) -> f64 {
        if computed <= 1 {
            return self.hit_ms;
        }
        (self.prefill_fixed_ms + self.prefill_ms_per_token * computed as f64).max(self.hit_ms)
    }

    /// What restoring `tokens` from the RAM cache costs (0 without a
    /// measurement: then it is priced like a hit).
    pub fn restore_ms(&self, tokens: u64) -> f64 {
        match &self.ram {
            Some(ram) if ram.tokens > 0 => ram.restore_ms * tokens as f64 / ram.tokens as f64,
            _ => 0.0,
        }
    }

    /// What saving a slot's `tokens` to the RAM cache costs.
    pub fn save_ms(&self, tokens: u64) -> f64 {
        match &self.ram {
            Some(ram) if ram.tokens > 0 => ram.save_ms * tokens as f64 / ram.tokens as f64,
            _ => 0.0,
        }
    }

    /// Fits `fixed + per_token × n` to the points by least squares (the
    /// intercept clamped at 0).
    pub fn fit(points: &[PrefillPoint]) -> Option<(f64, f64)> {
        let n = points.len() as f64;
        if points.len() < 2 {
            let p = points.first()?;
            return Some((0.0, (p.ms / p.tokens.max(1) as f64).max(1e-6)));
        }
        let mean_x = points.iter().map(|p| p.tokens as f64).sum::<f64>() / n;
        let mean_y = points.iter().map(|p| p.ms).sum::<f64>() / n;
        let sxx: f64 = points
            .iter()
            .map(|p| (p.tokens as f64 - mean_x).powi(2))
            .sum();
        let sxy: f64 = points
            .iter()
            .map(|p| (p.tokens as f64 - mean_x) * (p.ms - mean_y))
            .sum();
        let through_origin = || {
            // Noise (a loaded machine) can make the line flat or negative:
            // the line through the origin stays positive while times are.
            let sx2: f64 = points.iter().map(|p| (p.tokens as f64).powi(2)).sum();
            let sxy0: f64 = points.iter().map(|p| p.tokens as f64 * p.ms).sum();
            Some((0.0, (sxy0 / sx2.max(1.0)).max(1e-6)))
        };
        if sxx <= 0.0 {
            return through_origin();
        }
        let slope = sxy / sxx;
        let intercept = mean_y - slope * mean_x;
        if slope <= 0.0 || intercept < 0.0 {
            return through_origin();
        }
        Some((intercept, slope))
    }
}

/// What the profile says about `--cache-ram`: keep llama-server's RAM
/// cache, or turn it off, and why. `None`: nothing measured about it.
pub fn ram_tier_decision(profile: Option<&CostProfile>) -> Option<(bool, String)> {
    let ram = profile?.ram?;
    let why = format!(
        "measured on a {}-token prompt: restoring it from llama-server's RAM cache took {:.0} ms and saving it {:.0} ms, recomputing it {:.0} ms",
        ram.tokens, ram.restore_ms, ram.save_ms, ram.recompute_ms
    );
    Some(if ram.pays() {
        (true, format!("{why}: the RAM cache pays"))
    } else {
        (
            false,
            format!("{why}: the RAM cache costs more than it saves, so it is off"),
        )
    })
}

/// The cache key of a profile: everything that changes how fast a prompt
/// is computed. The binary and model are identified by path, size and
/// modification time (a rebuilt llama-server or a new download is a new key).
pub fn profile_key(binary: &Path, model: &Path, hw: &Hardware, speed_flags: &[String]) -> String {
    let identity = |path: &Path| {
        let meta = std::fs::metadata(path).ok();
        let size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        let mtime = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("{}:{size}:{mtime}", path.display())
    };
    let text = format!(
        "v{PROFILE_VERSION}\n{}\n{}\n{}|{:?}|{}|{:?}\n{}",
        identity(binary),
        identity(model),
        hw.chip,
        hw.accelerator,
        hw.memory_bytes,
        hw.gpu_name,
        speed_flags.join(" ")
    );
    format!("{:016x}", crate::reorder::text_hash(&text))
}

/// Where profiles are cached: `$CONTEXTPILOTD_CACHE/cost`, else the
/// per-user cache dir's `cost/`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CONTEXTPILOTD_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("cost"));
    }
    directories::ProjectDirs::from("", "", "contextpilotd").map(|d| d.cache_dir().join("cost"))
}

/// Reads a profile file. Missing or unreadable: `Err` with why.
pub fn read_profile(path: &Path) -> Result<CostProfile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let profile: CostProfile =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if profile.version != PROFILE_VERSION {
        return Err(format!(
            "{}: profile version {} (this daemon reads {PROFILE_VERSION})",
            path.display(),
            profile.version
        ));
    }
    let figures = [
        profile.prefill_fixed_ms,
        profile.prefill_ms_per_token,
        profile.hit_ms,
    ];
    if figures.iter().any(|f| !f.is_finite() || *f < 0.0) || profile.prefill_ms_per_token <= 0.0 {
        return Err(format!(
            "{}: prefill_fixed_ms and hit_ms must be >= 0 and prefill_ms_per_token > 0",
            path.display()
        ));
    }
    Ok(profile)
}

/// The cached profile for `key`, if one was measured.
pub fn cached_profile(key: &str) -> Option<CostProfile> {
    let path = cache_dir()?.join(format!("{key}.json"));
    read_profile(&path).ok().filter(|p| p.key == key)
}

/// Stores a measured profile under its key, atomically (a reader never sees
/// half a file; two daemons measuring at once leave one whole file).
pub fn store_profile(profile: &CostProfile) -> std::io::Result<PathBuf> {
    let dir = cache_dir().ok_or_else(|| std::io::Error::other("no cache directory"))?;
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.json", profile.key));
    let tmp = dir.join(format!(".{}.{}.tmp", profile.key, std::process::id()));
    let text = serde_json::to_string_pretty(profile).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The daemon's live cost model, shared by the slot table (which predicts)
/// and the settle stage of each request (which reports what happened).
#[derive(Debug)]
pub struct CostModel {
    profile: RwLock<Arc<CostProfile>>,
    /// llama-server's token count over the daemon's estimate, as f64 bits
    /// (an exponential average over answered requests).
    token_scale: AtomicU64,
    /// What the measurement is doing or found, for `/status`.
    note: std::sync::Mutex<TuneNote>,
}

/// The state of the measurement, as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TuneNote {
    pub measuring: bool,
    /// What it found or why it failed, and what that decided.
    pub message: Option<String>,
    /// The plan's settings decided by the measurement (`flag value: why`);
    /// empty until one lands.
    pub decisions: Vec<String>,
}

/// Weight of one observation in the token-scale average.
const SCALE_ALPHA: f64 = 0.2;

impl CostModel {
    pub fn new(profile: CostProfile) -> Arc<CostModel> {
        Arc::new(CostModel {
            profile: RwLock::new(Arc::new(profile)),
            token_scale: AtomicU64::new(1.0f64.to_bits()),
            note: Default::default(),
        })
    }

    pub fn note(&self) -> TuneNote {
        crate::sync::lock(&self.note).clone()
    }

    pub fn set_note(&self, measuring: bool, message: Option<String>) {
        let mut note = crate::sync::lock(&self.note);
        note.measuring = measuring;
        note.message = message;
    }

    pub fn set_decisions(&self, decisions: Vec<String>) {
        crate::sync::lock(&self.note).decisions = decisions;
    }

    pub fn profile(&self) -> Arc<CostProfile> {
        crate::sync::read(&self.profile).clone()
    }

    pub fn replace(&self, profile: CostProfile) {
        *crate::sync::write(&self.profile) = Arc::new(profile);
    }

    /// The daemon's estimates times this are llama-server's token counts.
    pub fn token_scale(&self) -> f64 {
        f64::from_bits(self.token_scale.load(Ordering::Relaxed))
    }

    /// A backend the daemon cannot measure (an upstream) computed
    /// `computed` tokens in `ms`: the prefill speed moves towards that.
    pub fn observe_prefill(&self, computed: u64, ms: f64) {
        if computed < 32 || !(ms.is_finite() && ms > 0.0) {
            return;
        }
        let mut profile = crate::sync::write(&self.profile);
        let mut next = profile.as_ref().clone();
        let observed = ms / computed as f64;
        next.prefill_ms_per_token += SCALE_ALPHA * (observed - next.prefill_ms_per_token);
        *profile = Arc::new(next);
    }

    /// A request was answered: it was estimated at `estimated` tokens and
    /// llama-server counted `actual`.
    pub fn observe_tokens(&self, estimated: u64, actual: u64) {
        if estimated == 0 || actual == 0 {
            return;
        }
        let ratio = (actual as f64 / estimated as f64).clamp(0.1, 10.0);
        let _ = self
            .token_scale
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                Some((old + SCALE_ALPHA * (ratio - old)).to_bits())
            });
    }

    /// A snapshot for slot choice: the profile and the token scale.
    pub fn view(&self) -> CostView {
        CostView {
            profile: self.profile(),
            token_scale: self.token_scale(),
        }
    }
}

/// The cost model as one slot choice sees it.
#[derive(Debug, Clone)]
pub struct CostView {
    pub profile: Arc<CostProfile>,
    pub token_scale: f64,
}

impl CostView {
    /// Real tokens for `estimated` of the daemon's estimated ones.
    pub fn tokens(&self, estimated: u64) -> u64 {
        (estimated as f64 * self.token_scale).round() as u64
    }

    /// Predicted prompt time for a prompt of `prompt` estimated tokens of
    /// which `reused` come from the slot.
    pub fn prompt_ms(&self, prompt: u64, reused: u64) -> f64 {
        let computed = self.tokens(prompt.saturating_sub(reused)).max(1);
        self.profile.prefill_ms(computed)
    }

    /// What computing `estimated` tokens costs (0 for none).
    pub fn compute_ms(&self, estimated: u64) -> f64 {
        if estimated == 0 {
            return 0.0;
        }
        self.profile.prefill_ms_per_token * self.tokens(estimated) as f64
    }

    /// 5 ms fixed and for a hit, 1 ms a token: round figures for tests.
    pub fn for_tests() -> CostView {
        CostView {
            profile: Arc::new(CostProfile::unmeasured(5.0, 1.0, 5.0)),
            token_scale: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_line_and_clamps_the_intercept() {
        let points: Vec<PrefillPoint> = [128u64, 512, 2048]
            .iter()
            .map(|&n| PrefillPoint {
                tokens: n,
                ms: 12.0 + 0.1 * n as f64,
            })
            .collect();
        let (a, b) = CostProfile::fit(&points).unwrap();
        assert!((a - 12.0).abs() < 1e-6 && (b - 0.1).abs() < 1e-9, "{a} {b}");
        // A negative intercept would predict negative times for short
        // prompts: the line goes through the origin instead.
        let steep = [
            PrefillPoint {
                tokens: 100,
                ms: 1.0,
            },
            PrefillPoint {
                tokens: 200,
                ms: 30.0,
            },
        ];
        let (a, b) = CostProfile::fit(&steep).unwrap();
        assert_eq!(a, 0.0);
        assert!(b > 0.0);
        // Noisy points whose line slopes down still give a positive cost.
        let noisy = [
            PrefillPoint {
                tokens: 16,
                ms: 300.0,
            },
            PrefillPoint {
                tokens: 32,
                ms: 120.0,
            },
            PrefillPoint {
                tokens: 64,
                ms: 200.0,
            },
        ];
        let (a, b) = CostProfile::fit(&noisy).unwrap();
        assert_eq!(a, 0.0);
        assert!(b > 0.0, "{b}");
        assert!(CostProfile::fit(&[]).is_none());
    }

    fn profile_with_ram(restore_ms: f64, save_ms: f64, recompute_ms: f64) -> CostProfile {
        CostProfile {
            ram: Some(RamCost {
                tokens: 4800,
                recompute_ms,
                restore_ms,
                save_ms,
            }),
            ..CostView::for_tests().profile.as_ref().clone()
        }
    }

    /// The CUDA case of the measurements behind this model: restoring cost
    /// as much as recomputing, so the tier goes; a cheap copy keeps it.
    #[test]
    fn the_ram_tier_decision_follows_the_measured_restore_cost() {
        let cuda = profile_with_ram(558.0, 530.0, 541.0);
        let (keep, why) = ram_tier_decision(Some(&cuda)).unwrap();
        assert!(!keep, "{why}");
        assert!(why.contains("558 ms"), "{why}");
        let unified = profile_with_ram(30.0, 25.0, 12000.0);
        assert!(ram_tier_decision(Some(&unified)).unwrap().0);
        assert!(ram_tier_decision(None).is_none());
        let unmeasured = CostView::for_tests().profile.as_ref().clone();
        assert!(ram_tier_decision(Some(&unmeasured)).is_none());
    }

    #[test]
    fn predictions_scale_with_computed_tokens() {
        let view = CostView::for_tests();
        assert_eq!(view.prompt_ms(100, 100), 5.0, "an exact hit");
        assert_eq!(view.prompt_ms(100, 0), 105.0);
        assert!(view.prompt_ms(1000, 900) < view.prompt_ms(1000, 100));
    }

    #[test]
    fn the_token_scale_moves_toward_what_llama_server_counts() {
        let model = CostModel::new(CostView::for_tests().profile.as_ref().clone());
        for _ in 0..50 {
            model.observe_tokens(100, 130);
        }
        assert!((model.token_scale() - 1.3).abs() < 0.01);
        model.observe_tokens(0, 10);
        assert!((model.token_scale() - 1.3).abs() < 0.01);
    }

    #[test]
    fn profiles_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let profile = profile_with_ram(1.0, 1.0, 100.0);
        std::fs::write(&path, serde_json::to_string(&profile).unwrap()).unwrap();
        assert_eq!(read_profile(&path).unwrap(), profile);
        std::fs::write(
            &path,
            r#"{"prefill_fixed_ms": 1, "prefill_ms_per_token": 0, "hit_ms": 1}"#,
        )
        .unwrap();
        assert!(read_profile(&path)
            .unwrap_err()
            .contains("prefill_ms_per_token"));
        std::fs::write(
            &path,
            r#"{"prefill_fixed_ms": 1, "prefill_ms_per_token": 0.5, "hit_ms": 1}"#,
        )
        .unwrap();
        let minimal = read_profile(&path).unwrap();
        assert_eq!(minimal.source, Source::Configured);
        assert!(minimal.ram.is_none());
    }
}
