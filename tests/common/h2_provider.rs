//! A provider that speaks HTTP/2 over TLS (ALPN `h2`), as the real APIs are reached: every
//! request gets the same canned response. Its certificate (`tests/fixtures/tls`) is
//! signed by a test CA that a gateway trusts through `SSL_CERT_FILE`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Status, headers in order, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
}

/// What the provider does with a connection once it has answered a request on it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AfterAnswer {
    /// Keeps it open for more requests.
    KeepOpen,
    /// Sends GOAWAY (no further streams), then closes it once the answer is out.
    GoAway,
    /// Closes it without a word (no GOAWAY), as a provider's idle timeout or a load
    /// balancer's restart does: a client learns only when it next reads or writes.
    Drop,
}

pub struct H2Provider {
    addr: SocketAddr,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Counts {
    /// Requests answered.
    answered: AtomicUsize,
    /// How many of the next requests to refuse (RST_STREAM with REFUSED_STREAM: "not
    /// processed, safe to retry", as a provider shedding load or restarting says).
    to_refuse: AtomicUsize,
    refused: AtomicUsize,
    /// HTTP/2 connections set up (TLS and the HTTP/2 handshake done).
    connections: AtomicUsize,
}

/// The CA that signed the provider's certificate, for `SSL_CERT_FILE`.
pub fn test_ca() -> String {
    format!("{}/tls/ca.pem", super::fixtures_dir().display())
}

impl H2Provider {
    /// Answers every request with `status`, `headers` (in this order) and `body`.
    pub async fn start(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> H2Provider {
        Self::start_with(status, headers, body, AfterAnswer::KeepOpen).await
    }

    /// As `start`, doing `after` with each connection once it has answered on it.
    pub async fn start_with(
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        after: AfterAnswer,
    ) -> H2Provider {
        pingora::tls::install_default_crypto_provider();
        let dir = super::fixtures_dir().join("tls");
        let (certs, key) = pingora::tls::load_certs_and_key_files(
            &dir.join("provider.pem").display().to_string(),
            &dir.join("provider.key").display().to_string(),
        )
        .expect("read the test certificate")
        .expect("a certificate and a key");
        let mut tls = pingora::tls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("TLS config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = pingora::tls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let counts = Arc::new(Counts::default());
        let answer = Arc::new(Answer {
            status,
            headers,
            body: Bytes::from(body),
        });
        let counted = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, answer, counted) =
                    (acceptor.clone(), answer.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut conn) = h2::server::handshake(tls).await else {
                        return;
                    };
                    counted.connections.fetch_add(1, Ordering::SeqCst);
                    while let Some(Ok((request, mut respond))) = conn.accept().await {
                        let refuse = counted
                            .to_refuse
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if refuse {
                            counted.refused.fetch_add(1, Ordering::SeqCst);
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        counted.answered.fetch_add(1, Ordering::SeqCst);
                        let answering = tokio::spawn(answer_one(request, respond, answer.clone()));
                        match after {
                            AfterAnswer::KeepOpen => {}
                            AfterAnswer::GoAway => {
                                conn.graceful_shutdown();
                                // Driven to its end: the answer goes out, then the close.
                                while let Some(Ok(_)) = conn.accept().await {}
                                return;
                            }
                            AfterAnswer::Drop => {
                                drive_until(&mut conn, &answering).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        H2Provider { addr, counts, task }
    }

    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Requests answered (refused ones, and ones on a connection closed before their
    /// answer, are not).
    pub fn request_count(&self) -> usize {
        self.counts.answered.load(Ordering::SeqCst)
    }

    /// Refuses the next `n` requests with REFUSED_STREAM.
    pub fn refuse_next(&self, n: usize) {
        self.counts.to_refuse.store(n, Ordering::SeqCst);
    }

    /// HTTP/2 connections the provider has accepted.
    pub fn connection_count(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    pub fn refused_count(&self) -> usize {
        self.counts.refused.load(Ordering::SeqCst)
    }
}

/// Drives `conn` (which writes the answer's frames) until `answering` has queued all of
/// them and a moment more to flush them; the caller then drops the connection.
async fn drive_until<T>(
    conn: &mut h2::server::Connection<T, Bytes>,
    answering: &tokio::task::JoinHandle<()>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let bound = tokio::time::Instant::now() + Duration::from_secs(5);
    while !answering.is_finished() && tokio::time::Instant::now() < bound {
        let _ = tokio::time::timeout(Duration::from_millis(5), conn.accept()).await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(50), conn.accept()).await;
}

async fn answer_one(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    answer: Arc<Answer>,
) {
    let mut body = request.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let mut response = http::Response::builder().status(answer.status);
    for (name, value) in &answer.headers {
        response = response.header(name.as_str(), value.as_str());
    }
    let Ok(response) = response.body(()) else {
        return;
    };
    if let Ok(mut send) = respond.send_response(response, false) {
        let _ = send.send_data(answer.body.clone(), true);
    }
}

impl Drop for H2Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}
