//! A minimal HTTP/1.1 server for the agent's local endpoints (metrics, health):
//! GET only, one response per connection, bounded in every way a client
//! could abuse it: connections at once, time to send the request and to take
//! the answer, and answers rendered off the async workers so a slow render
//! never stalls the control loop.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// Maps a path to (status line, body).
pub type Handler = Arc<dyn Fn(&str) -> (&'static str, String) + Send + Sync>;

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Answers rendered at once (each may read every map).
const MAX_RENDERS: usize = 2;
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Listen on `addr:port` and answer with `handler` until the process exits.
pub async fn serve(addr: IpAddr, port: u16, what: &str, handler: Handler) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(addr, port))
        .await
        .with_context(|| format!("{what} {addr} port {port}: cannot listen"))?;
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let renders = Arc::new(Semaphore::new(MAX_RENDERS));
    tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // EMFILE and the like: wait rather than spin on accept.
                    log::warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                drop(sock);
                continue;
            };
            let (handler, renders) = (handler.clone(), renders.clone());
            tokio::spawn(async move {
                let _permit = permit;
                answer(sock, handler, renders).await;
            });
        }
    });
    Ok(())
}

async fn answer(mut sock: TcpStream, handler: Handler, renders: Arc<Semaphore>) {
    let Ok(Some(path)) = tokio::time::timeout(READ_TIMEOUT, read_path(&mut sock)).await else {
        return;
    };
    let Ok(_render) = renders.acquire().await else {
        return;
    };
    let Ok((status, body)) = tokio::task::spawn_blocking(move || handler(&path)).await else {
        return;
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sock.write_all(resp.as_bytes())).await;
}

/// The request line's path, once the whole header has arrived (at most 4 KiB).
async fn read_path(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 4096 {
            return None;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let req = String::from_utf8_lossy(&buf);
    req.split_whitespace().nth(1).map(str::to_string)
}
