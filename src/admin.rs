//! The admin listener: Prometheus metrics, health, and the usage API. Keep it on a
//! private interface. The usage API takes the admin token (`Authorization: Bearer`), or a
//! gateway key, which sees only its own team's usage.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::auth::{self, Caller};
use crate::pricing::format_usd;
use crate::proxy::State;
use crate::record::unix_ms;
use crate::store::Period;
use crate::usage_api::{self, GroupBy, Query};

/// The usage page: self-contained (no CDN), embedded in the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

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

fn json_reply(status: u16, v: serde_json::Value) -> Response<Vec<u8>> {
    reply(status, "application/json", v.to_string().into_bytes())
}

fn error(status: u16, message: &str) -> Response<Vec<u8>> {
    json_reply(
        status,
        json!({"error": {"message": message, "status": status}}),
    )
}

/// Who is asking the usage API.
enum Viewer {
    Admin,
    Key(std::sync::Arc<Caller>),
}

impl Admin {
    fn viewer(&self, session: &ServerSession) -> Option<Viewer> {
        let h = &session.req_header().headers;
        let presented = auth::presented_key(
            h.get("authorization").map(|v| v.as_bytes()),
            h.get("x-api-key").map(|v| v.as_bytes()),
        )?;
        if let Some(token) = &self.state.admin_token {
            if auth::constant_time_eq(&auth::hash_key(presented), &auth::hash_key(token)) {
                return Some(Viewer::Admin);
            }
        }
        self.state
            .live()
            .keys
            .authenticate(Some(presented))
            .ok()
            .map(Viewer::Key)
    }

    async fn ready(&self) -> Response<Vec<u8>> {
        let store = self.state.store.healthy().await;
        let ledger = self.state.ledger.healthy();
        let status = if store && ledger { 200 } else { 503 };
        json_reply(
            status,
            json!({"status": if status == 200 { "ready" } else { "degraded" }, "store": store, "ledger": ledger}),
        )
    }

    async fn usage(&self, path: &str, query: &str, viewer: Viewer) -> Response<Vec<u8>> {
        let today = unix_ms(SystemTime::now()) / 86_400_000;
        if path == "/v1/usage/me" {
            return match viewer {
                Viewer::Key(c) => self.me(&c, today).await,
                Viewer::Admin => error(
                    400,
                    "/v1/usage/me answers for a gateway key, not the admin token",
                ),
            };
        }
        if let Some(id) = path.strip_prefix("/v1/usage/requests/") {
            return self.one_request(id, &viewer);
        }
        let preset = match path {
            "/v1/usage" => None,
            "/v1/usage/monthly" => Some(GroupBy::Month),
            "/v1/usage/by-prompt" => Some(GroupBy::PromptKey),
            "/v1/usage/by-team" => Some(GroupBy::Team),
            "/v1/usage/version-comparison" => Some(GroupBy::Version),
            _ => return error(404, "not found"),
        };
        let mut q = match Query::parse(query, today) {
            Ok(q) => q,
            Err(e) => return error(400, &e.to_string()),
        };
        if preset == Some(GroupBy::Version) && q.filters.prompt_key.is_none() {
            return error(400, "prompt_key: required for version-comparison");
        }
        if let Some(g) = preset {
            q.group_by = Some(g);
        }
        if let Viewer::Key(c) = &viewer {
            q.filters.team = Some(c.team.clone());
        }
        let shared = match self.state.shared_rollups(q.start_day, q.end_day).await {
            Ok(s) => s,
            Err(e) => return error(503, &format!("shared usage rollups: {e}")),
        };
        if q.csv {
            let csv = match &shared {
                Some(rollups) => usage_api::to_csv(&q, rollups),
                None => usage_api::to_csv(&q, &*self.state.ledger),
            };
            return reply(200, "text/csv; charset=utf-8", csv.into_bytes());
        }
        let answer = match &shared {
            Some(rollups) => usage_api::answer(rollups, &q),
            None => usage_api::answer(&*self.state.ledger, &q),
        };
        let mut v = usage_api::to_json(&q, &answer);
        v["budget"] = self.budget_status(&q).await;
        json_reply(200, v)
    }

    /// The spend of the filtered scope (a customer, team, key or feature; else global) in
    /// each period, as the budget store counts it.
    async fn budget_status(&self, q: &Query) -> serde_json::Value {
        let f = &q.filters;
        let scope = match (&f.customer, &f.team, &f.key, &f.feature) {
            (Some(c), _, _, _) => format!("customer:{c}"),
            (_, Some(t), _, _) => format!("team:{t}"),
            (_, _, Some(k), _) => format!("key:{k}"),
            (_, _, _, Some(x)) => format!("feature:{x}"),
            _ => "global".to_string(),
        };
        let mut spent = serde_json::Map::new();
        for p in [Period::Daily, Period::Monthly, Period::Total] {
            if let Ok(n) = self.state.store.spent(&scope, p).await {
                spent.insert(
                    p.label().into(),
                    json!({"spent": format_usd(n), "spent_nano": n}),
                );
            }
        }
        json!({"scope": scope, "periods": spent})
    }

    fn one_request(&self, id: &str, viewer: &Viewer) -> Response<Vec<u8>> {
        match self.state.ledger.get(id) {
            Some(r)
                if matches!(viewer, Viewer::Admin)
                    || matches!(viewer, Viewer::Key(c) if r.team.as_deref() == Some(c.team.as_str())) =>
            {
                json_reply(200, serde_json::to_value(&r).unwrap_or_default())
            }
            _ => error(404, "no such request (or older than the index)"),
        }
    }

    async fn me(&self, c: &Caller, today: u64) -> Response<Vec<u8>> {
        let (y, m, _) = crate::store::civil_from_days(today as i64);
        let start = crate::store::days_from_civil(y, m, 1) as u64;
        let shared = match self.state.shared_rollups(start, today).await {
            Ok(s) => s,
            Err(e) => return error(503, &format!("shared usage rollups: {e}")),
        };
        let spend = |filters: usage_api::Filters| {
            let q = Query {
                filters,
                start_day: start,
                end_day: today,
                group_by: None,
                csv: false,
            };
            match &shared {
                Some(rollups) => usage_api::answer(rollups, &q).total,
                None => usage_api::answer(&*self.state.ledger, &q).total,
            }
        };
        let key = spend(usage_api::Filters {
            key: Some(c.key_id.clone()),
            ..Default::default()
        });
        let team = spend(usage_api::Filters {
            team: Some(c.team.clone()),
            ..Default::default()
        });
        let attribution = crate::attribution::Attribution {
            team: Some(c.team.clone()),
            key_id: Some(c.key_id.clone()),
            ..Default::default()
        };
        let (checks, applied) = self.state.live().policy.checks(&attribution);
        let mut budgets = Vec::new();
        for b in applied {
            let Some(scope) = checks.get(b.scope).map(|c| c.scope.as_str()) else {
                continue;
            };
            let spent = self
                .state
                .store
                .spent(scope, b.rule.period)
                .await
                .unwrap_or(0);
            let (_, reset) = b.rule.period.window(unix_ms(SystemTime::now()));
            budgets.push(json!({
                "scope": scope,
                "period": b.rule.period.label(),
                "cap": format_usd(b.rule.cap_usd),
                "spent": format_usd(spent),
                "remaining": format_usd(b.rule.cap_usd.saturating_sub(spent)),
                "reset_ms": reset,
            }));
        }
        json_reply(
            200,
            json!({
                "key_id": c.key_id,
                "team": c.team,
                "month_to_date": {
                    "key": {"cost": format_usd(key.cost_nano), "cost_nano": key.cost_nano, "requests": key.requests},
                    "team": {"cost": format_usd(team.cost_nano), "cost_nano": team.cost_nano, "requests": team.requests},
                },
                "budgets": budgets,
            }),
        )
    }
}

/// Admin request bodies are small JSON documents.
const MAX_ADMIN_BODY: usize = 1 << 20;

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(error(413, "request body larger than 1 MiB"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(error(400, &format!("could not read the request body: {e}"))),
        }
    }
}

/// Paths of the management API (see `manage`), which takes the admin token only.
fn is_management(path: &str) -> bool {
    [
        "/v1/budgets",
        "/v1/teams",
        "/v1/keys",
        "/v1/prompts",
        "/customer/",
        "/budget/",
    ]
    .iter()
    .any(|p| {
        path == p.trim_end_matches('/')
            || path.starts_with(&format!("{}/", p.trim_end_matches('/')))
    })
}

impl Admin {
    async fn manage(
        &self,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> Response<Vec<u8>> {
        let m = crate::manage::Manage { state: &self.state };
        match m.handle(method, path, query, body).await {
            Some(Ok((status, v))) => json_reply(status, v),
            Some(Err(e)) => {
                if e.status() >= 500 {
                    log::warn!("admin {method} {path}: {e}");
                }
                error(e.status(), &e.to_string())
            }
            None => error(404, "not found"),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // A graceful shutdown waits for it (`crate::shutdown`).
        let _running = self.state.work.hold();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        let method = session.req_header().method.as_str().to_string();
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        if is_management(&path) {
            return match self.viewer(session) {
                Some(Viewer::Admin) => self.manage(&method, &path, &query, &body).await,
                Some(Viewer::Key(_)) => error(403, "this endpoint needs the admin token"),
                None => error(401, "send the admin token as Authorization: Bearer"),
            };
        }
        match path.as_str() {
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4",
                self.state.metrics.render(),
            ),
            "/healthz" => json_reply(200, json!({"status": "ok"})),
            "/readyz" => self.ready().await,
            "/dashboard" => reply(
                200,
                "text/html; charset=utf-8",
                DASHBOARD.as_bytes().to_vec(),
            ),
            p if p.starts_with("/v1/usage") => {
                if method != "GET" {
                    return error(405, "use GET");
                }
                match self.viewer(session) {
                    Some(v) => self.usage(p, &query, v).await,
                    None => error(
                        401,
                        "send the admin token or a gateway key as Authorization: Bearer",
                    ),
                }
            }
            _ => error(404, "not found"),
        }
    }
}
