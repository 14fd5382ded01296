//! The server with our own client: graceful shutdown with requests in flight,
//! and handshake refusals.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_nbd::{BASE_ALLOCATION, BlockSource, Client, ClientError, ConnectOptions, Server};
use tokio_util::sync::CancellationToken;

/// 16 MiB where byte i reads as (i / 4096) as u8; every read takes 300 ms.
struct SlowSource;

impl BlockSource for SlowSource {
    fn size(&self) -> u64 {
        16 << 20
    }
    async fn read_at(&self, offset: u64, length: usize) -> io::Result<Bytes> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok((offset..offset + length as u64)
            .map(|i| (i / 4096) as u8)
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let server = Server::new().with_export("slow", "", Arc::new(SlowSource));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let sock = sock.clone();
        let token = shutdown.clone();
        async move { server.serve_unix_path(&sock, token).await }
    });
    while !sock.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let client = Client::connect_unix(&sock, &ConnectOptions::new("slow"))
        .await
        .unwrap();
    let reads: Vec<_> = (0..20u64)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { (i, c.read(i * 65536, 8192).await) })
        })
        .collect();
    // Let the server take every request, then shut down while they sleep.
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    for r in reads {
        let (i, data) = r.await.unwrap();
        let data = data.unwrap_or_else(|e| panic!("read {i} failed across shutdown: {e}"));
        assert_eq!(data[0], (i * 16) as u8);
    }
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let err = client.read(0, 512).await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "{err}");
    // New connections are refused once the server is gone.
    assert!(
        Client::connect_unix(&sock, &ConnectOptions::new("slow"))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let server = Server::new().with_export("slow", "", Arc::new(SlowSource));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let sock = sock.clone();
        let token = shutdown.clone();
        async move { server.serve_unix_path(&sock, token).await }
    });
    while !sock.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let err = Client::connect_unix(&sock, &ConnectOptions::new("nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::UnknownExport { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");

    let opts = ConnectOptions::new("slow").meta_context("qemu:dirty-bitmap:b0");
    let err = Client::connect_unix(&sock, &opts).await.unwrap_err();
    assert!(
        matches!(err, ClientError::MetaContextUnavailable(_)),
        "{err}"
    );

    // The empty name selects the only export.
    let default = Client::connect_unix(&sock, &ConnectOptions::new(""))
        .await
        .unwrap();
    assert_eq!(default.size(), 16 << 20);
    drop(default);

    // The SlowSource reports everything as data: one extent over the whole export.
    let client = Client::connect_unix(
        &sock,
        &ConnectOptions::new("slow").meta_context(BASE_ALLOCATION),
    )
    .await
    .unwrap();
    let extents = client.extents(BASE_ALLOCATION).await.unwrap();
    assert_eq!(extents.len(), 1);
    assert_eq!(
        (extents[0].offset, extents[0].length, extents[0].flags),
        (0, 16 << 20, 0)
    );
    // Reads past the end are refused before they are sent.
    assert!(matches!(
        client.read(16 << 20, 1).await,
        Err(ClientError::InvalidRequest(_))
    ));
    drop(client);

    shutdown.cancel();
    task.await.unwrap().unwrap();
}
