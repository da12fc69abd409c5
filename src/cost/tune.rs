//! Measuring a running llama-server: prefill at a few prompt lengths, an
//! exact prefix hit, and its host-RAM prompt cache's save and restore.
//!
//! Every request is a native `/completion` of random token ids (so lengths
//! are exact and no two prompts share a prefix by accident) pinned to one
//! slot with `id_slot`, with one token generated. Prefill figures are
//! llama-server's own `timings.prompt_ms`. The RAM cache works outside that
//! figure (llama-server saves and loads prompts while it picks the slot), so
//! its costs are wall-clock times of whole requests less the request
//! overhead an exact hit shows.
//!
//! The longest prompt is chosen so that it takes about
//! [`LONGEST_PROMPT_MS`] on this machine (measured first on a short one),
//! within the slot's context: a few seconds in all on a CPU, less on a GPU.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::{json, Value};

use super::{CostProfile, PrefillPoint, RamCost, Source, PROFILE_VERSION};

/// About how long the longest measured prompt should take.
pub const LONGEST_PROMPT_MS: f64 = 1500.0;
/// The longest prompt measured, in tokens, whatever the machine.
pub const MAX_PROMPT_TOKENS: u64 = 4096;
/// One request of the measurement may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Save/restore round trips measured (the median is kept).
const RAM_ROUNDS: usize = 2;

/// Where and how to measure.
#[derive(Debug, Clone)]
pub struct TuneTarget {
    pub port: u16,
    /// The slot to use; the caller keeps other requests off it.
    pub slot: usize,
    /// Tokens one slot holds.
    pub ctx_per_slot: u32,
    /// The model's vocabulary size (token ids are drawn below it).
    pub n_vocab: Option<u64>,
    /// Whether the child runs with llama-server's RAM prompt cache.
    pub ram_tier: bool,
    /// The key the child requires.
    pub key: Option<crate::supervisor::process::ChildKey>,
}

struct Answer {
    wall_ms: f64,
    prompt_ms: f64,
    cache_n: u64,
}

struct Prober {
    client: Client<HttpConnector, Full<Bytes>>,
    target: TuneTarget,
    /// Random state for token ids (xorshift).
    state: u64,
    vocab_low: u64,
    vocab_high: u64,
}

impl Prober {
    fn new(target: TuneTarget) -> Prober {
        let high = target.n_vocab.unwrap_or(32_000).clamp(2_000, 30_000);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Prober {
            client: crate::http_client::loopback_client(),
            target,
            state: seed,
            vocab_low: 1_000,
            vocab_high: high,
        }
    }

    /// A prompt of `n` random token ids.
    fn prompt(&mut self, n: u64) -> Vec<u64> {
        (0..n)
            .map(|_| {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.vocab_low + self.state % (self.vocab_high - self.vocab_low)
            })
            .collect()
    }

    async fn complete(&self, prompt: &[u64]) -> Result<Answer, String> {
        let body = json!({
            "prompt": prompt,
            "n_predict": 1,
            "id_slot": self.target.slot,
            "cache_prompt": true,
            "temperature": 0.0,
        });
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://127.0.0.1:{}/completion", self.target.port))
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.target.key {
            request = request.header(hyper::header::AUTHORIZATION, key.bearer());
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("llama-server did not answer: {e}"))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("llama-server stopped answering: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "llama-server answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string())
        };
        let value = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))??;
        let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        let timings = value.get("timings");
        let num = |k: &str| timings.and_then(|t| t.get(k)).and_then(Value::as_f64);
        Ok(Answer {
            wall_ms,
            prompt_ms: num("prompt_ms").ok_or("the answer has no timings.prompt_ms")?,
            cache_n: num("cache_n").unwrap_or(0.0) as u64,
        })
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Measures the child on `target.port`. The profile comes back without its
/// cache key (the caller knows what it measured).
pub async fn measure(target: TuneTarget) -> Result<CostProfile, String> {
    let started = Instant::now();
    let ram_tier = target.ram_tier;
    let ctx_limit = u64::from(target.ctx_per_slot).saturating_sub(16).max(32);
    let mut p = Prober::new(target);

    // Warm up (first requests pay for graph allocation), then a short cold
    // prompt gives the speed to size the others by.
    let warm = p.prompt(32.min(ctx_limit));
    p.complete(&warm).await?;
    let probe_len = 64.min(ctx_limit);
    let probe = p.prompt(probe_len);
    let probed = p.complete(&probe).await?;
    let per_token = (probed.prompt_ms / probe_len as f64).max(1e-3);
    // At least four times the probe, so the lengths spread enough for the
    // fit to see the slope through a loaded machine's noise.
    let longest = ((LONGEST_PROMPT_MS / per_token) as u64)
        .clamp(4 * probe_len, MAX_PROMPT_TOKENS)
        .min(ctx_limit);
    let mut lengths: Vec<u64> = [longest / 4, longest / 2, longest]
        .into_iter()
        .map(|n| n.max(16))
        .collect();
    lengths.dedup();

    let mut points = vec![PrefillPoint {
        tokens: probe_len,
        ms: probed.prompt_ms,
    }];
    let mut last = Vec::new();
    let mut recompute_ms = 0.0;
    for &n in &lengths {
        last = p.prompt(n);
        let cold = p.complete(&last).await?;
        points.push(PrefillPoint {
            tokens: n,
            ms: cold.prompt_ms,
        });
        recompute_ms = cold.prompt_ms;
    }
    points.sort_by_key(|pt| pt.tokens);
    let (fixed, per_token) = CostProfile::fit(&points).ok_or("no prefill was measured")?;

    // An exact hit: the same prompt again on the same slot.
    let hit = p.complete(&last).await?;
    // What a request costs besides its prompt (HTTP, one generated token).
    let overhead = (hit.wall_ms - hit.prompt_ms).max(0.0);

    let mut ram = None;
    if ram_tier {
        let longest_prompt = last.clone();
        let mut saves = Vec::new();
        let mut restores = Vec::new();
        let mut restored = true;
        for _ in 0..RAM_ROUNDS {
            // Replacing the long prompt saves it to the RAM cache first.
            let other = p.prompt(probe_len);
            let replaced = p.complete(&other).await?;
            saves.push((replaced.wall_ms - replaced.prompt_ms - overhead).max(0.0));
            // Asking for it again restores it from there.
            let back = p.complete(&longest_prompt).await?;
            if back.cache_n * 2 < longest {
                restored = false;
                break;
            }
            restores.push((back.wall_ms - back.prompt_ms - overhead).max(0.0) + back.prompt_ms);
        }
        if restored {
            ram = Some(RamCost {
                tokens: longest,
                recompute_ms,
                restore_ms: median(restores),
                save_ms: median(saves),
            });
        } else {
            tracing::warn!(
                "llama-server did not restore a prompt from its RAM cache during the measurement; its cost is not known"
            );
        }
    }
    // Leave the slot holding a few tokens, so the next prompt there has
    // little to save.
    let tiny = p.prompt(8.min(ctx_limit));
    p.complete(&tiny).await?;

    Ok(CostProfile {
        version: PROFILE_VERSION,
        source: Source::Measured,
        key: String::new(),
        measured_at: Some(crate::supervisor::rfc3339_utc(std::time::SystemTime::now())),
        build_info: None,
        prefill: points,
        prefill_fixed_ms: fixed,
        prefill_ms_per_token: per_token,
        hit_ms: hit.prompt_ms.max(0.01),
        ram,
        took_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
