//! Workload generators shared by the benches.

/// Deterministic splitmix64 stream.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` contexts of 10–20 blocks. Each context belongs to one of about n/25
/// topics; three quarters of its blocks come from its topic's pool of 40
/// blocks (skewed towards the popular ones), the rest from a long tail shared
/// by all topics, plus a handful of globally popular blocks.
pub fn topical_batch(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng(seed);
    let topics = (n / 25).max(4) as u64;
    let pool = 40u64;
    let tail = 5 * n as u64;
    let tail_base = topics * pool;
    let hot_base = tail_base + tail;
    (0..n)
        .map(|_| {
            let t = rng.below(topics);
            let len = 10 + rng.below(11) as usize;
            let mut ctx = Vec::with_capacity(len);
            while ctx.len() < len {
                let r = rng.below(100);
                let id = if r < 75 {
                    // Squaring skews the pick towards the start of the pool.
                    let u = rng.below(pool * pool);
                    let k = pool - 1 - ((u as f64).sqrt() as u64).min(pool - 1);
                    t * pool + k
                } else if r < 97 {
                    tail_base + rng.below(tail)
                } else {
                    hot_base + rng.below(8)
                };
                let id = id as u32;
                if !ctx.contains(&id) {
                    ctx.push(id);
                }
            }
            ctx
        })
        .collect()
}
