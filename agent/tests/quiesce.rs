//! The guest agent client against a scripted guest agent: the protocol edges
//! a real qemu-ga rarely shows (stale replies, a hanging agent, errors). The
//! real guest's happy path is tested end to end in the e2e crate.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_agent::qga::{GuestAgent, QgaError, socket_beside};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers everything like qemu-ga.
    Normal,
    /// Sends a stale reply before the sync delimiter, like an agent that
    /// still holds the reply of an abandoned session.
    Stale,
    /// Answers the sync but never the freeze.
    HangOnFreeze,
    /// Refuses the freeze with an error.
    RefuseFreeze,
}

/// A scripted guest agent; records the commands it received and whether
/// the "guest" is frozen.
struct FakeAgent {
    log: Arc<Mutex<Vec<String>>>,
    frozen: Arc<Mutex<bool>>,
}

fn fake_agent(socket: &Path, mode: Mode) -> FakeAgent {
    let listener = UnixListener::bind(socket).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let frozen = Arc::new(Mutex::new(false));
    let (l, f) = (log.clone(), frozen.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (l, f) = (l.clone(), f.clone());
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                loop {
                    // qemu-ga drops a 0xFF byte (its parser reset).
                    let mut line = Vec::new();
                    if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    line.retain(|b| *b != 0xff);
                    let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    let cmd = msg["execute"].as_str().unwrap_or_default().to_string();
                    l.lock().unwrap().push(cmd.clone());
                    let reply = match cmd.as_str() {
                        "guest-sync-delimited" => {
                            let mut out = Vec::new();
                            if mode == Mode::Stale {
                                out.extend_from_slice(b"{\"return\": 7}\n");
                            }
                            out.push(0xff);
                            out.extend_from_slice(
                                format!("{}\n", json!({"return": msg["arguments"]["id"]}))
                                    .as_bytes(),
                            );
                            w.write_all(&out).await.unwrap();
                            continue;
                        }
                        "guest-fsfreeze-freeze" if mode == Mode::HangOnFreeze => continue,
                        "guest-fsfreeze-freeze" if mode == Mode::RefuseFreeze => {
                            json!({"error": {"class": "GenericError", "desc": "failed to freeze /data: Device or resource busy"}})
                        }
                        "guest-fsfreeze-freeze" => {
                            *f.lock().unwrap() = true;
                            json!({"return": 2})
                        }
                        "guest-fsfreeze-thaw" => {
                            let was = std::mem::replace(&mut *f.lock().unwrap(), false);
                            json!({"return": if was { 2 } else { 0 }})
                        }
                        "guest-ping" => json!({"return": {}}),
                        _ => json!({"error": {"class": "CommandNotFound", "desc": "unknown"}}),
                    };
                    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                }
            });
        }
    });
    FakeAgent { log, frozen }
}

fn agent(socket: &Path) -> GuestAgent {
    GuestAgent::new("ns/vm1", socket, Duration::from_millis(500))
}

#[test]
fn the_socket_is_found_beside_the_monitor() {
    assert_eq!(
        socket_beside(Path::new("/run/cairn/qmp/team-a/db.sock")),
        Path::new("/run/cairn/qmp/team-a/db.qga.sock")
    );
}

#[tokio::test]
async fn the_operation_runs_between_freeze_and_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.qga.sock");
    let fake = fake_agent(&sock, Mode::Normal);
    let frozen = fake.frozen.clone();
    let (seen, report) = agent(&sock)
        .quiesced(async { *frozen.lock().unwrap() })
        .await
        .unwrap();
    assert!(seen, "the operation ran while the guest was not frozen");
    assert_eq!(report.frozen_filesystems, 2);
    assert!(report.thaw_error.is_none());
    assert!(!*fake.frozen.lock().unwrap(), "left frozen");
    let log = fake.log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw"
        ]
    );
}

#[tokio::test]
async fn a_stale_reply_before_the_delimiter_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.qga.sock");
    let fake = fake_agent(&sock, Mode::Stale);
    agent(&sock).ping().await.unwrap();
    let (_, report) = agent(&sock).quiesced(async {}).await.unwrap();
    assert_eq!(report.frozen_filesystems, 2);
    assert!(!*fake.frozen.lock().unwrap());
}

#[tokio::test]
async fn no_socket_is_unavailable_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let ran = Arc::new(Mutex::new(false));
    let r = ran.clone();
    let err = agent(&dir.path().join("vm1.qga.sock"))
        .quiesced(async move { *r.lock().unwrap() = true })
        .await
        .unwrap_err();
    assert!(matches!(err, QgaError::Unavailable { .. }), "{err}");
    assert_eq!(err.reason(), "QuiesceUnavailable");
    assert!(!*ran.lock().unwrap(), "the operation ran without a freeze");
}

#[tokio::test]
async fn a_regular_file_is_not_a_guest_agent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1.qga.sock");
    std::fs::write(&path, b"").unwrap();
    let err = agent(&path).ping().await.unwrap_err();
    assert_eq!(err.reason(), "QuiesceUnavailable", "{err}");
}

#[tokio::test]
async fn a_hanging_freeze_times_out_thaws_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.qga.sock");
    let fake = fake_agent(&sock, Mode::HangOnFreeze);
    let ran = Arc::new(Mutex::new(false));
    let r = ran.clone();
    let started = std::time::Instant::now();
    let err = agent(&sock)
        .quiesced(async move { *r.lock().unwrap() = true })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QgaError::Timeout { command, .. } if command == "guest-fsfreeze-freeze"),
        "{err}"
    );
    assert_eq!(err.reason(), "QuiesceTimeout");
    assert!(!*ran.lock().unwrap());
    // A thaw was sent on a fresh session, in case the freeze lands late.
    let log = fake.log.lock().unwrap().clone();
    assert_eq!(log.last().map(String::as_str), Some("guest-fsfreeze-thaw"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no hard deadline"
    );
}

#[tokio::test]
async fn a_refused_freeze_names_the_guests_reason() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.qga.sock");
    let _fake = fake_agent(&sock, Mode::RefuseFreeze);
    let err = agent(&sock).quiesced(async {}).await.unwrap_err();
    assert_eq!(err.reason(), "QuiesceFailed");
    assert!(err.to_string().contains("Device or resource busy"), "{err}");
}

#[tokio::test]
async fn a_socket_nobody_answers_on_times_out() {
    // QEMU's chardev socket exists, but no qemu-ga runs in the guest.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.qga.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let err = agent(&sock).ping().await.unwrap_err();
    assert_eq!(err.reason(), "QuiesceTimeout", "{err}");
    drop(listener);
}
