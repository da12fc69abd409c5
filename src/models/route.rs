//! Which backend of a model a request goes to: the local child or one of
//! the `[[upstream]]` servers.
//!
//! Cache-aware routing prices each healthy backend by predicted time, the
//! way slots are priced within one: the prompt time of the tokens its slot
//! table does not hold (from what was routed there), at its own prefill
//! speed, plus a wait when all its slots are taken, divided by its weight.
//! SGLang's router adds the rule kept here: when the load is out of
//! balance (the busiest backend more than `balance_abs` requests and more
//! than `balance_rel` times ahead of the idlest) the least loaded backend
//! is taken whatever the cache says, so one hot prefix never takes every
//! request. A conversation or session stays on its backend while that is
//! healthy and the load in balance.

use crate::config::{RoutingConfig, RoutingPolicy};

/// What one backend offers a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    pub healthy: bool,
    /// Requests holding it now.
    pub in_flight: usize,
    /// Requests it runs at once.
    pub concurrency: usize,
    /// The request's predicted prompt time there.
    pub predicted_ms: f64,
    pub weight: f64,
    /// The request's conversation or session went there last.
    pub sticky: bool,
}

impl Offer {
    /// Predicted time including a wait for a slot when all are taken (each
    /// request ahead counted at this one's own predicted time), per weight.
    pub fn score(&self) -> f64 {
        let ahead = (self.in_flight + 1).saturating_sub(self.concurrency.max(1));
        (self.predicted_ms * (1 + ahead) as f64) / self.weight.max(1e-6)
    }
}

/// Why a backend was chosen (for the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The only one (or none healthy: the first, to wait for).
    Only,
    RoundRobin,
    /// The load was out of balance: the least loaded.
    Balance,
    /// Where its conversation or session went before.
    Sticky,
    /// The lowest predicted time.
    Predicted,
}

/// The index of the backend to use, and why; `turn` counts requests for
/// round robin.
pub fn choose(offers: &[Offer], config: &RoutingConfig, turn: usize) -> (usize, Reason) {
    let healthy: Vec<usize> = (0..offers.len()).filter(|&i| offers[i].healthy).collect();
    match healthy.len() {
        0 => return (0, Reason::Only),
        1 => return (healthy[0], Reason::Only),
        _ => {}
    }
    if config.policy == RoutingPolicy::RoundRobin {
        return (healthy[turn % healthy.len()], Reason::RoundRobin);
    }
    let load = |i: usize| offers[i].in_flight;
    let busiest = healthy.iter().map(|&i| load(i)).max().unwrap_or(0);
    let idlest = healthy.iter().map(|&i| load(i)).min().unwrap_or(0);
    let out_of_balance = busiest.saturating_sub(idlest) > config.balance_abs as usize
        && busiest as f64 > config.balance_rel * idlest as f64;
    let by_score = |a: &usize, b: &usize| {
        offers[*a]
            .score()
            .total_cmp(&offers[*b].score())
            .then(load(*a).cmp(&load(*b)))
            .then(a.cmp(b))
    };
    if out_of_balance {
        let least = healthy
            .iter()
            .copied()
            .filter(|&i| load(i) == idlest)
            .min_by(by_score)
            .unwrap_or(healthy[0]);
        return (least, Reason::Balance);
    }
    if let Some(&sticky) = healthy.iter().find(|&&i| offers[i].sticky) {
        return (sticky, Reason::Sticky);
    }
    let best = healthy
        .iter()
        .copied()
        .min_by(by_score)
        .unwrap_or(healthy[0]);
    (best, Reason::Predicted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(in_flight: usize, predicted_ms: f64) -> Offer {
        Offer {
            healthy: true,
            in_flight,
            concurrency: 1,
            predicted_ms,
            weight: 1.0,
            sticky: false,
        }
    }

    #[test]
    fn the_cheapest_backend_wins_while_the_load_is_balanced() {
        let config = RoutingConfig::default();
        let offers = [offer(0, 400.0), offer(0, 40.0), offer(1, 400.0)];
        assert_eq!(choose(&offers, &config, 0), (1, Reason::Predicted));
        // A wait for its only slot counts: one ahead doubles the time.
        let offers = [offer(0, 100.0), offer(1, 60.0)];
        assert_eq!(choose(&offers, &config, 0), (0, Reason::Predicted));
        // Weight: a backend twice as heavy takes what is up to twice as slow.
        let mut heavy = offer(0, 150.0);
        heavy.weight = 2.0;
        assert_eq!(choose(&[offer(0, 100.0), heavy], &config, 0).0, 1);
    }

    #[test]
    fn out_of_balance_the_least_loaded_wins_whatever_the_cache_says() {
        let config = RoutingConfig::default();
        let mut hot = offer(4, 1.0);
        hot.concurrency = 8;
        let offers = [hot.clone(), offer(1, 900.0), offer(0, 800.0)];
        assert_eq!(choose(&offers, &config, 0), (2, Reason::Balance));
        // Within the thresholds the cache decides: 3 vs 1 is only 2 apart.
        let mut warm = offer(3, 1.0);
        warm.concurrency = 8;
        let offers = [warm, offer(1, 900.0)];
        assert_eq!(choose(&offers, &config, 0), (0, Reason::Predicted));
    }

    #[test]
    fn sessions_stick_to_a_healthy_backend() {
        let config = RoutingConfig::default();
        let mut sticky = offer(0, 500.0);
        sticky.sticky = true;
        assert_eq!(
            choose(&[offer(0, 10.0), sticky.clone()], &config, 0),
            (1, Reason::Sticky)
        );
        sticky.healthy = false;
        assert_eq!(
            choose(&[offer(0, 10.0), sticky], &config, 0),
            (0, Reason::Only)
        );
    }

    #[test]
    fn round_robin_cycles_over_the_healthy_ones() {
        let config = RoutingConfig {
            policy: RoutingPolicy::RoundRobin,
            ..RoutingConfig::default()
        };
        let mut down = offer(0, 1.0);
        down.healthy = false;
        let offers = [offer(0, 1.0), down, offer(0, 1.0)];
        let picks: Vec<usize> = (0..4).map(|t| choose(&offers, &config, t).0).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert_eq!(choose(&[], &config, 3), (0, Reason::Only));
    }
}
