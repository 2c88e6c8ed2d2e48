//! The wire APIs Tollgate speaks. Everything that differs between OpenAI and Anthropic
//! formats is decided from these two enums, so the proxy phases never branch on a
//! provider name.

/// The family of wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// OpenAI and every OpenAI-compatible server (Together, OpenRouter, vLLM, llama.cpp, ...).
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

/// One priced or forwarded route. The endpoint fixes the request and response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Messages,
    /// Anthropic's token counter: forwarded, never priced.
    CountTokens,
}

impl Endpoint {
    /// Maps the path after the optional provider prefix (e.g. `/v1/chat/completions`).
    pub fn from_path(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/v1/messages" => Endpoint::Messages,
            "/v1/messages/count_tokens" => Endpoint::CountTokens,
            _ => return None,
        })
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
            Endpoint::CountTokens => "/v1/messages/count_tokens",
        }
    }

    /// The wire format family the endpoint belongs to.
    pub fn kind(self) -> ProviderKind {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => ProviderKind::Anthropic,
            _ => ProviderKind::OpenAi,
        }
    }

    /// Whether responses on this endpoint carry billable usage.
    pub fn is_priced(self) -> bool {
        !matches!(self, Endpoint::CountTokens)
    }

    /// Short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
        }
    }
}
