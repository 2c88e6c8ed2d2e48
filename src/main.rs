//! `tollgate`: an LLM gateway on Pingora that forwards OpenAI and Anthropic calls and
//! meters and prices every token.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;

use tollgate::config::{self, Config};
use tollgate::proxy::{Gateway, State};
use tollgate::{admin, auth, store};

/// See Cargo.toml: measured fewer context switches and less CPU per request than glibc's.
/// The `system-alloc` feature leaves it out, so heap profilers that replace `malloc`
/// (valgrind's DHAT, `scripts/count --allocations`) see every allocation.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage:
  tollgate --config FILE            run the gateway (also -c FILE)
  tollgate check-config FILE        validate a config file and exit
  tollgate key new --team TEAM [--id ID]
                                    mint a gateway key; prints it once with its hash";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--config" | "-c", file] => run(PathBuf::from(file)),
        ["check-config", file] => check_config(PathBuf::from(file)),
        ["key", "new", rest @ ..] => key_new(rest),
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn check_config(file: PathBuf) -> ExitCode {
    match Config::load(&file) {
        Ok(c) => {
            if c.prices.is_empty() {
                eprintln!("warning: no prices configured: every priced call will be refused");
            }
            println!(
                "{}: ok ({} providers, {} models, {} priced models, {} keys)",
                file.display(),
                c.providers.len(),
                c.models.len(),
                c.prices.len(),
                c.keys.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flag<'a>(rest: &[&'a str], name: &str) -> Option<&'a str> {
    rest.windows(2).find(|w| w[0] == name).map(|w| w[1])
}

fn key_new(rest: &[&str]) -> ExitCode {
    let Some(team) = flag(rest, "--team") else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let key = match auth::mint_key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: no random source: {e}");
            return ExitCode::FAILURE;
        }
    };
    let id = flag(rest, "--id").map_or_else(
        || format!("{team}-{}", &key[key.len() - 6..]),
        str::to_string,
    );
    let hash = auth::to_hex(&auth::hash_key(&key));
    println!("key:    {key}");
    println!("        (shown once; only its hash is kept)");
    println!("config: keys:\n  - id: {id}\n    team: {team}\n    sha256: {hash}");
    ExitCode::SUCCESS
}

fn open_ledger(
    config: &Config,
    metrics: &tollgate::metrics::Metrics,
) -> Result<Arc<tollgate::ledger::Ledger>, String> {
    let errors = metrics.ledger_errors.clone();
    tollgate::ledger::Ledger::open(&config.server.data_dir, Box::new(move || errors.inc()))
        .map_err(|e| format!("{}: {e}", config.server.data_dir.display()))
}

fn open_store(config: &Config) -> Result<Arc<dyn store::Store>, String> {
    match config.store.kind {
        config::StoreKind::Memory => {
            let dir = &config.server.data_dir;
            let s = store::memory::MemoryStore::open(dir, store::memory::system_clock())
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(Arc::new(s))
        }
        config::StoreKind::Redis => {
            let redis: Arc<dyn store::Store> =
                Arc::new(store::lazy::LazyRedis::new(&config.store)?);
            if config.store.slice_requests == 0 {
                return Ok(redis);
            }
            Ok(Arc::new(store::slices::Sliced::new(
                redis,
                config.store.slice_requests,
                std::time::Duration::from_millis(config.store.slice_ms),
            )))
        }
    }
}

/// Keeps this gateway's copy of the admin catalog current with the store, and adds its
/// usage rollups to the shared ones (Redis).
struct CatalogRefresh {
    state: Arc<State>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for CatalogRefresh {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let every =
            std::time::Duration::from_millis(self.state.config.store.catalog_refresh_ms.max(10));
        let mut force = true;
        loop {
            match self.state.refresh_catalog(force).await {
                Ok(()) => force = false,
                Err(e) => log::debug!("catalog refresh: {e}"),
            }
            self.state.push_rollups().await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                // The drain pushes the last rollups, after the last request.
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// On SIGTERM: lets what is running finish, makes the books durable, and exits without
/// sleeping out the rest of Pingora's grace period (see `tollgate::shutdown`).
struct Drain {
    state: Arc<State>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Drain {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let within =
            std::time::Duration::from_secs(self.state.config.server.shutdown_drain_seconds);
        let left = tollgate::shutdown::drain(&self.state, within).await;
        tollgate::shutdown::report(&left);
        std::process::exit(0);
    }
}

fn run(file: PathBuf) -> ExitCode {
    if let Err(e) = tollgate::logger::init() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let config = match Config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listen = config.server.listen.clone();
    let admin_listen = config.server.admin_listen.clone();
    let conf = ServerConf {
        threads: config.server.threads,
        work_stealing: config.server.work_stealing,
        // Longer than the drain, which ends the process itself when it is done: Pingora's
        // runtimes must outlive it, or requests in flight are dropped mid-way.
        grace_period_seconds: Some(config.server.shutdown_drain_seconds + 2),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let h2c = config.server.h2c;
    let store = match open_store(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}: store: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let metrics = match tollgate::metrics::Metrics::new(&config.metrics) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ledger = match open_ledger(&config, &metrics) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let state = match State::new(config, store, ledger, metrics) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway {
            state: state.clone(),
        },
        "tollgate proxy",
    );
    if let Some(app) = proxy.app_logic_mut() {
        let mut options = HttpServerOptions::default();
        options.h2c = h2c;
        app.server_options = Some(options);
    }
    proxy.add_tcp(&listen);
    let mut admin = Service::new(
        "tollgate admin".to_string(),
        admin::Admin {
            state: state.clone(),
        },
    );
    admin.add_tcp(&admin_listen);
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(pingora::services::background::background_service(
        "tollgate catalog",
        CatalogRefresh {
            state: state.clone(),
        },
    ));
    server.add_service(pingora::services::background::background_service(
        "tollgate drain",
        Drain {
            state: state.clone(),
        },
    ));
    eprintln!("tollgate: proxy on {listen}, admin on {admin_listen}");
    // Returns after a fast shutdown (SIGINT); a graceful one ends in `Drain`.
    server.run(pingora::server::RunArgs::default());
    tollgate::shutdown::last_writes(&state);
    ExitCode::SUCCESS
}
