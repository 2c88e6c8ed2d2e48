//! Tollgate: an LLM gateway on Pingora that forwards OpenAI and Anthropic calls and
//! meters and prices every token. The binary is `src/main.rs`; the modules follow a
//! request's path (see README, "How it works").

pub mod admin;
pub mod admission;
pub mod alerts;
pub mod api;
pub mod attribution;
pub mod auth;
pub mod body;
pub mod breaker;
pub mod budgets;
pub mod catalog;
pub mod config;
pub mod errors;
pub mod exchange;
pub mod fastfmt;
pub mod ledger;
pub mod logger;
pub mod manage;
pub mod metrics;
pub mod pricing;
pub mod providers;
pub mod proxy;
pub mod record;
pub mod respond;
pub mod routing;
pub mod runaway;
pub mod sandbox;
pub mod settler;
pub mod shutdown;
pub mod sse;
pub mod store;
pub mod usage;
pub mod usage_api;
