//! The models the daemon can serve, by name.
//!
//! * `discover`: GGUF files where people already keep them (the Hugging
//!   Face hub cache, LM Studio, Ollama's store, `$LLAMA_CACHE`,
//!   `[models] dirs`), read from their headers.
//! * `pull`: downloading a GGUF from the Hugging Face hub into the hub
//!   cache's own layout.
//! * `fleet`: the models served by name and which are loaded: loading on
//!   demand within the memory budget, least-recently-used unloading,
//!   `keep_alive`.
//! * `engine`: one loaded model: its supervised child, plan, slot table
//!   and cost model; `tuner`: its background measurement.
//! * `route`: which backend of a model a request goes to (the local child
//!   or an `[[upstream]]`), by predicted time with SGLang's imbalance rule;
//!   `probe`: each upstream's health, on the channel a child's view uses.

pub mod discover;
pub mod engine;
pub mod fleet;
pub mod probe;
pub mod pull;
pub mod route;
pub mod tuner;

pub use engine::{Engine, EngineUse, LoadedModel};
pub use fleet::{Fleet, FleetError, ModelSpec};
