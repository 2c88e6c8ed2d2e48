//! `bare_proxy`: the benchmarks' baseline — the least a Pingora 0.9.1 proxy can do.
//!
//! One `ProxyHttp` that forwards every request, unread and unchanged, to one upstream over
//! pooled HTTP/1.1 keep-alive connections. Same Pingora version, thread count, h2c setting
//! and shutdown settings as the `tollgate` binary, no logging, so the difference between
//! the two is what Tollgate does per request. Loopback addresses only.
//!
//! ```text
//! bare_proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--threads 2] [--work-stealing true]
//! ```

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::proxy::{http_proxy_service_with_name, ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn usage() -> ! {
    eprintln!("usage: bare_proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--threads N] [--work-stealing true|false]");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut listen: Option<SocketAddr> = None;
    let mut upstream: Option<SocketAddr> = None;
    let mut threads = 2usize;
    let mut work_stealing = true;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().unwrap_or_else(|_| usage())),
            "--upstream" => upstream = Some(value.parse().unwrap_or_else(|_| usage())),
            "--threads" => threads = value.parse().unwrap_or_else(|_| usage()),
            "--work-stealing" => work_stealing = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else {
        usage()
    };
    if !listen.ip().is_loopback() || !upstream.ip().is_loopback() {
        eprintln!("bare_proxy: loopback addresses only");
        std::process::exit(2);
    }
    let conf = ServerConf {
        threads,
        work_stealing,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = http_proxy_service_with_name(&server.configuration, Bare { upstream }, "bare");
    if let Some(app) = proxy.app_logic_mut() {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        app.server_options = Some(options);
    }
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    eprintln!("bare_proxy: {listen} -> {upstream}");
    server.run_forever()
}
