//! Downloading a GGUF from the Hugging Face hub into its cache layout.
