//! A loopback TCP proxy that a test puts between Cairn and a server (the S3
//! server of a repository) to make uploads slow, so a fault can be injected
//! while an upload is really in flight rather than by timing luck.
//!
//! Bytes from the client to the server are forwarded at most `rate` bytes per
//! second per connection (0 = as fast as they come); answers are not slowed.
//! The proxy runs on its own thread and runtime, so a test that blocks its own
//! runtime (kubectl, QMP) does not stall it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; stops when dropped.
pub struct SlowLink {
    /// `127.0.0.1:<port>` clients connect to.
    pub addr: SocketAddr,
    rate: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SlowLink {
    /// Listens on a free loopback port and forwards to `upstream` at `rate`
    /// bytes per second (client → server).
    pub fn start(upstream: SocketAddr, rate: u64) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rate = Arc::new(AtomicU64::new(rate));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = rate.clone();
        std::thread::Builder::new()
            .name("slow-link".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("proxy listener");
                    tokio::select! {
                        _ = stopped => {}
                        () = accept_loop(listener, upstream, shared) => {}
                    }
                });
            })?;
        Ok(Self {
            addr,
            rate,
            stop: Some(stop),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the rate of every connection, open or new (0 = unlimited).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::SeqCst);
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, rate: Arc<AtomicU64>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let rate = rate.clone();
        tokio::spawn(async move {
            // A server that is down: the client sees its connection closed.
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            let up = async {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match client_rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if server_wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let r = rate.load(Ordering::SeqCst);
                    if r > 0 {
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / r as f64)).await;
                    }
                }
                let _ = server_wr.shutdown().await;
            };
            let down = async {
                let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
                let _ = client_wr.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}
