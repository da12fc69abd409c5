//! Placeholder until the GPU sampler lands.
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GpuWindow {
    pub samples: u32,
}

pub struct GpuSampler;

impl GpuSampler {
    pub fn start(_interval: Duration) -> Arc<GpuSampler> {
        Arc::new(GpuSampler)
    }
    pub fn window(&self, _from: Instant, _to: Instant) -> Option<GpuWindow> {
        None
    }
    pub fn unavailable_reason(&self) -> Option<String> {
        Some("not built yet".into())
    }
}
