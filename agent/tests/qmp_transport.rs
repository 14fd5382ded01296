//! The QMP transport against a scripted fake peer (unknown events, garbage,
//! a hang) and against a real QEMU that restarts.

mod common;

use std::time::Duration;

use cairn_agent::qmp::{QmpClient, QmpError, QmpOptions};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 9, "minor": 0, "major": 99}, "package": ""}, "capabilities": ["oob", "future-cap"]}}"#;

/// Serves one connection: answers commands per `script`.
async fn fake_peer(listener: UnixListener, hang_on: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let msg: Value = serde_json::from_str(&line).unwrap();
                let id = msg["id"].clone();
                let cmd = msg["execute"].as_str().unwrap_or("").to_string();
                if cmd == hang_on {
                    continue; // never answer
                }
                // Noise before every reply: garbage, an event nobody knows, a reply to nobody.
                let noise = "this is not json\n{\"event\": \"FROM_THE_FUTURE\", \"data\": {\"x\": 1}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n{\"return\": {}, \"id\": 999999}\n{\"weird\": true}\n";
                w.write_all(noise.as_bytes()).await.unwrap();
                let reply = match cmd.as_str() {
                    "query-jobs" => {
                        json!({"return": [{"id": "j1", "type": "brand-new-job-type", "status": "running", "current-progress": 5, "total-progress": 10, "extra": {}}], "id": id})
                    }
                    "fail" => json!({"error": {"class": "GenericError", "desc": "nope"}, "id": id}),
                    "bye" => return,
                    _ => json!({"return": {"echo": cmd}, "id": id}),
                };
                w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        });
    }
}

fn opts() -> QmpOptions {
    QmpOptions {
        command_timeout: Duration::from_secs(1),
        ..fast_options()
    }
}

#[tokio::test]
async fn fake_peer_noise_errors_timeouts_and_reconnect() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    tokio::spawn(fake_peer(listener, "hang"));
    let client = QmpClient::connect(&sock, opts()).await.unwrap();
    assert_eq!(client.qemu_version().as_deref(), Some("99.0.9"));
    let mut events = client.subscribe();

    // Pipelined commands, each answered after noise.
    let (a, b, c) = tokio::join!(
        client.execute_raw("one", None),
        client.execute_raw("two", Some(json!({"k": 1}))),
        client.query_jobs(),
    );
    assert_eq!(a.unwrap()["echo"], "one");
    assert_eq!(b.unwrap()["echo"], "two");
    let jobs = c.unwrap();
    assert_eq!(jobs[0].job_type, "brand-new-job-type");
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.name, "FROM_THE_FUTURE");
    assert_eq!(ev.timestamp_us, Some(1_000_002));

    // QEMU errors are errors, not disconnects.
    let e = client.execute_raw("fail", None).await.unwrap_err();
    assert!(
        matches!(e, QmpError::Command { ref class, .. } if class == "GenericError"),
        "{e}"
    );

    // A hung command times out; the session stays usable.
    let e = client.execute_raw("hang", None).await.unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert_eq!(
        client.execute_raw("after", None).await.unwrap()["echo"],
        "after"
    );

    // The peer drops the connection mid-command: in-flight fails, then we reconnect.
    let e = client.execute_raw("bye", None).await.unwrap_err();
    assert!(e.is_disconnect(), "{e}");
    let mut state = client.state();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|s| {
            matches!(
                s,
                cairn_agent::qmp::ConnectionState::Connected { generation: 2, .. }
            )
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        client.execute_raw("again", None).await.unwrap()["echo"],
        "again"
    );
}

#[tokio::test]
async fn peer_that_never_greets_or_is_absent() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mute.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // accept, say nothing
        }
    });
    let o = QmpOptions {
        handshake_timeout: Duration::from_millis(300),
        ..opts()
    };
    let e = QmpClient::connect(&sock, o.clone()).await.unwrap_err();
    assert!(e.is_disconnect(), "{e}");
    let e = QmpClient::connect(dir.path().join("absent.sock"), o)
        .await
        .unwrap_err();
    assert!(e.is_disconnect(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_events_and_reconnect_after_restart() {
    let mut vm = TestVm::start("qmp", &[("disk0", "qcow2", 8 * MIB)]).await;
    assert!(vm.client.qemu_version().unwrap().starts_with("10."));
    let mut events = vm.client.subscribe();
    let st = vm.client.query_run_state().await.unwrap();
    assert!(!st.is_empty());
    vm.client.execute_raw("stop", None).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.name, "STOP");
    vm.quit().await;
    vm.restart().await;
    let blocks = vm.client.query_block().await.unwrap();
    assert_eq!(blocks.len(), 1);
}
