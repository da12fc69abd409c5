//! The models the daemon can serve, by name.
//!
//! * `discover`: GGUF files where people already keep them (the Hugging
//!   Face hub cache, LM Studio, Ollama's store, `$LLAMA_CACHE`,
//!   `[models] dirs`), read from their headers.
//! * `pull`: downloading a GGUF from the Hugging Face hub into the hub
//!   cache's own layout.

pub mod discover;
pub mod pull;
