//! The Redis store (placeholder until the Lua implementation lands).
