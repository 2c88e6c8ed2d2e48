//! `x-tollgate-sandbox: true`: a simulated provider response in the exact wire format of
//! the endpoint (JSON or SSE), deterministic for a given request body, with realistic
//! usage. It is metered, priced and recorded like a real call, without any network.

use std::collections::VecDeque;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api::Endpoint;
use crate::errors::GatewayError;
use crate::exchange::Upstream;

const WORDS: &[&str] = &[
    "Tollgate",
    "simulated",
    "this",
    "response",
    "is",
    "a",
    "from",
    "the",
    "sandbox",
    "no",
    "provider",
    "was",
    "called",
    "and",
    "usage",
    "priced",
    "like",
    "real",
    "call",
    "tokens",
];

/// What the sandbox needs to know about the (already rewritten) upstream request.
pub struct SandboxRequest<'a> {
    pub endpoint: Endpoint,
    pub model: &'a str,
    pub stream: bool,
    pub include_usage: bool,
    pub max_output_tokens: Option<u64>,
    pub body: &'a [u8],
}

struct Plan {
    id: String,
    created: u64,
    input_tokens: u64,
    words: Vec<&'static str>,
}

impl Plan {
    fn new(req: &SandboxRequest) -> Plan {
        let digest = Sha256::digest(req.body);
        let seed = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default());
        let wanted = 8 + seed % 40;
        let count = req
            .max_output_tokens
            .map_or(wanted, |m| wanted.min(m.max(1)));
        let words = (0..count)
            .map(|i| WORDS[((seed >> (i % 8)) as usize + i as usize * 7) % WORDS.len()])
            .collect();
        Plan {
            id: crate::auth::to_hex(&digest[8..20]),
            created: 1_700_000_000 + seed % 100_000_000,
            // Roughly four bytes of JSON per token, the usual rule of thumb.
            input_tokens: (req.body.len() as u64 / 4).max(1),
            words,
        }
    }

    fn output_tokens(&self) -> u64 {
        self.words.len() as u64
    }

    fn text(&self) -> String {
        self.words.join(" ")
    }

    /// One piece per token: the first word bare, the rest with their leading space.
    fn pieces(&self) -> impl Iterator<Item = String> + '_ {
        self.words.iter().enumerate().map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
    }
}

pub fn respond(req: &SandboxRequest) -> Result<Upstream, GatewayError> {
    let plan = Plan::new(req);
    let (content_type, chunks) = match (req.stream, req.endpoint) {
        (false, _) | (true, Endpoint::Embeddings | Endpoint::CountTokens) => (
            "application/json",
            vec![Bytes::from(json_body(req, &plan).to_string())],
        ),
        (true, _) => ("text/event-stream; charset=utf-8", sse_events(req, &plan)),
    };
    let mut header =
        ResponseHeader::build(200, Some(4)).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let _ = header.insert_header("content-type", content_type);
    if !req.stream {
        let len: usize = chunks.iter().map(Bytes::len).sum();
        let _ = header.insert_header("content-length", len.to_string());
    }
    Ok(Upstream::own(header, VecDeque::from(chunks)))
}

fn openai_usage(plan: &Plan) -> Value {
    json!({
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": plan.output_tokens(),
        "total_tokens": plan.input_tokens + plan.output_tokens(),
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0}
    })
}

fn responses_usage(plan: &Plan) -> Value {
    json!({
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": plan.output_tokens(),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.input_tokens + plan.output_tokens()
    })
}

fn anthropic_usage(plan: &Plan, output: u64) -> Value {
    json!({
        "input_tokens": plan.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output
    })
}

fn responses_object(req: &SandboxRequest, plan: &Plan, done: bool) -> Value {
    json!({
        "id": format!("resp_sbx{}", plan.id),
        "object": "response",
        "created_at": plan.created,
        "status": if done { "completed" } else { "in_progress" },
        "model": req.model,
        "output": if done { json!([{
            "type": "message", "id": format!("msg_sbx{}", plan.id), "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": plan.text(), "annotations": []}]
        }]) } else { json!([]) },
        "usage": if done { responses_usage(plan) } else { Value::Null }
    })
}

fn json_body(req: &SandboxRequest, plan: &Plan) -> Value {
    match req.endpoint {
        Endpoint::ChatCompletions => json!({
            "id": format!("chatcmpl-sbx{}", plan.id),
            "object": "chat.completion",
            "created": plan.created,
            "model": req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": plan.text(), "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": openai_usage(plan)
        }),
        Endpoint::Completions => json!({
            "id": format!("cmpl-sbx{}", plan.id),
            "object": "text_completion",
            "created": plan.created,
            "model": req.model,
            "choices": [{"text": plan.text(), "index": 0, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": plan.input_tokens, "completion_tokens": plan.output_tokens(),
                      "total_tokens": plan.input_tokens + plan.output_tokens()}
        }),
        Endpoint::Embeddings => json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0,
                      "embedding": plan.words.iter().map(|w| w.len() as f64 / 10.0).collect::<Vec<_>>()}],
            "model": req.model,
            "usage": {"prompt_tokens": plan.input_tokens, "total_tokens": plan.input_tokens}
        }),
        Endpoint::Responses => responses_object(req, plan, true),
        Endpoint::Messages => json!({
            "id": format!("msg_sbx{}", plan.id),
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [{"type": "text", "text": plan.text()}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": anthropic_usage(plan, plan.output_tokens())
        }),
        Endpoint::CountTokens => json!({"input_tokens": plan.input_tokens}),
    }
}

fn data_event(v: Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn named_event(name: &str, v: Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

fn sse_events(req: &SandboxRequest, plan: &Plan) -> Vec<Bytes> {
    match req.endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => openai_events(req, plan),
        Endpoint::Responses => responses_events(req, plan),
        _ => anthropic_events(req, plan),
    }
}

fn openai_events(req: &SandboxRequest, plan: &Plan) -> Vec<Bytes> {
    let chat = req.endpoint == Endpoint::ChatCompletions;
    let usage_field = |v: &mut Value| {
        if req.include_usage {
            v["usage"] = Value::Null;
        }
    };
    let chunk = |choice: Value| {
        let mut v = json!({
            "id": format!("{}-sbx{}", if chat { "chatcmpl" } else { "cmpl" }, plan.id),
            "object": if chat { "chat.completion.chunk" } else { "text_completion" },
            "created": plan.created,
            "model": req.model,
            "choices": [choice]
        });
        usage_field(&mut v);
        data_event(v)
    };
    let mut events = Vec::new();
    if chat {
        events.push(chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": null, "finish_reason": null}),
        ));
    }
    for piece in plan.pieces() {
        events.push(chunk(if chat {
            json!({"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null})
        } else {
            json!({"text": piece, "index": 0, "logprobs": null, "finish_reason": null})
        }));
    }
    events.push(chunk(if chat {
        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"})
    } else {
        json!({"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"})
    }));
    if req.include_usage {
        events.push(data_event(json!({
            "id": format!("{}-sbx{}", if chat { "chatcmpl" } else { "cmpl" }, plan.id),
            "object": if chat { "chat.completion.chunk" } else { "text_completion" },
            "created": plan.created,
            "model": req.model,
            "choices": [],
            "usage": openai_usage(plan)
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn responses_events(req: &SandboxRequest, plan: &Plan) -> Vec<Bytes> {
    let mut seq = 0u64;
    let mut ev = |name: &str, mut v: Value| {
        v["type"] = json!(name);
        v["sequence_number"] = json!(seq);
        seq += 1;
        named_event(name, v)
    };
    let item_id = format!("msg_sbx{}", plan.id);
    let mut events = vec![
        ev(
            "response.created",
            json!({"response": responses_object(req, plan, false)}),
        ),
        ev(
            "response.in_progress",
            json!({"response": responses_object(req, plan, false)}),
        ),
    ];
    for piece in plan.pieces() {
        events.push(ev(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push(ev(
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": plan.text()}),
    ));
    events.push(ev(
        "response.completed",
        json!({"response": responses_object(req, plan, true)}),
    ));
    events
}

fn anthropic_events(req: &SandboxRequest, plan: &Plan) -> Vec<Bytes> {
    let mut events = vec![named_event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": format!("msg_sbx{}", plan.id), "type": "message", "role": "assistant",
            "model": req.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": anthropic_usage(plan, 1)
        }}),
    )];
    events.push(named_event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.push(named_event("ping", json!({"type": "ping"})));
    for piece in plan.pieces() {
        events.push(named_event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push(named_event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(named_event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": plan.output_tokens()}}),
    ));
    events.push(named_event("message_stop", json!({"type": "message_stop"})));
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{from_json_body, Usage};

    fn req(endpoint: Endpoint, stream: bool, body: &[u8]) -> SandboxRequest<'_> {
        SandboxRequest {
            endpoint,
            model: "gpt-4o",
            stream,
            include_usage: true,
            max_output_tokens: None,
            body,
        }
    }

    fn body_of(up: Result<Upstream, GatewayError>) -> Vec<u8> {
        use crate::exchange::Source;
        match up.expect("sandbox answers").source {
            Source::Sandbox { chunks, .. } => chunks.into_iter().flat_map(|b| b.to_vec()).collect(),
            Source::Provider { .. } => panic!("sandbox must not use a provider"),
        }
    }

    #[test]
    fn deterministic_per_body_and_varies_between_bodies() {
        let a = body_of(respond(&req(
            Endpoint::ChatCompletions,
            false,
            b"{\"a\":1}",
        )));
        let b = body_of(respond(&req(
            Endpoint::ChatCompletions,
            false,
            b"{\"a\":1}",
        )));
        let c = body_of(respond(&req(
            Endpoint::ChatCompletions,
            false,
            b"{\"a\":2}",
        )));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn json_bodies_carry_parseable_usage_for_every_endpoint() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there"}]}"#;
        for endpoint in [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Embeddings,
            Endpoint::Responses,
            Endpoint::Messages,
        ] {
            let out = body_of(respond(&req(endpoint, false, body)));
            let usage: Usage = from_json_body(endpoint, &out).expect("usage present");
            assert_eq!(usage.total_input(), body.len() as u64 / 4, "{endpoint:?}");
        }
    }

    #[test]
    fn max_tokens_bounds_the_output() {
        let mut r = req(Endpoint::Messages, false, b"{}");
        r.max_output_tokens = Some(3);
        let out = body_of(respond(&r));
        let usage = from_json_body(Endpoint::Messages, &out).expect("usage");
        assert_eq!(usage.output_tokens, 3);
    }
}
