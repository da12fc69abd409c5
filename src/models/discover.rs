//! Finding GGUF files where other tools keep them.
