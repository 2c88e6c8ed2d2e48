//! The admin listener: Prometheus metrics and health. Keep it on a private interface.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::proxy::State;

pub struct Admin {
    pub state: Arc<State>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let _ = session.drain_request_body().await;
        match path.as_str() {
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4",
                self.state.metrics.render(),
            ),
            "/healthz" => reply(200, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/readyz" => match self.state.store.healthy().await {
                true => reply(200, "application/json", br#"{"status":"ready"}"#.to_vec()),
                false => reply(
                    503,
                    "application/json",
                    br#"{"status":"degraded","store":"unavailable"}"#.to_vec(),
                ),
            },
            _ => reply(
                404,
                "application/json",
                br#"{"error":"not found"}"#.to_vec(),
            ),
        }
    }
}
