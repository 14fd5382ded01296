//! A scripted QEMU guest agent on a unix socket, for the quiesce edges a
//! real guest does not show on demand: an agent that hangs, one that holds
//! a freeze long enough to kill Cairn's agent in the middle. The real
//! guest's happy path runs against qemu-ga in the test guest.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

/// How the fake answers `guest-fsfreeze-freeze`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FreezeBehaviour {
    /// At once, like qemu-ga.
    Answer,
    /// Never (a hung guest agent); everything else is answered.
    Hang,
    /// After this long (the first freeze only; later ones at once).
    HoldFirst(Duration),
}

#[derive(Default)]
struct State {
    commands: Vec<String>,
    frozen: bool,
    freezes: usize,
}

/// A running fake guest agent; stops listening when dropped.
pub struct FakeGuestAgent {
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

impl FakeGuestAgent {
    /// Listens on `path` (e.g. `<qmp dir>/<ns>/<vm>.qga.sock`).
    pub fn start(path: &Path, behaviour: FreezeBehaviour) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let st = st.clone();
                std::thread::spawn(move || serve(stream, behaviour, &st));
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            state,
        })
    }

    /// Commands received so far, in order.
    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().commands.clone()
    }

    /// Whether the "guest" is frozen now.
    pub fn frozen(&self) -> bool {
        self.state.lock().unwrap().frozen
    }

    /// Waits until `command` has been received `count` times.
    pub fn wait_for(&self, command: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self
                .commands()
                .iter()
                .filter(|c| c.as_str() == command)
                .count();
            if n >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{command} not received {count} time(s) within {timeout:?}; got {:?}",
                    self.commands()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeGuestAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Unblock the accept loop so its thread ends.
        let _ = UnixStream::connect(&self.path);
    }
}

fn serve(stream: UnixStream, behaviour: FreezeBehaviour, st: &Mutex<State>) {
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            return;
        }
        // qemu-ga drops 0xFF bytes: they reset its parser.
        line.retain(|b| *b != 0xff);
        let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        let cmd = msg["execute"].as_str().unwrap_or_default().to_string();
        let first_freeze = {
            let mut s = st.lock().unwrap();
            s.commands.push(cmd.clone());
            if cmd == "guest-fsfreeze-freeze" {
                s.freezes += 1;
            }
            s.freezes == 1
        };
        let reply: Vec<u8> = match cmd.as_str() {
            "guest-sync-delimited" => {
                let mut out = vec![0xff];
                out.extend_from_slice(
                    json!({"return": msg["arguments"]["id"]})
                        .to_string()
                        .as_bytes(),
                );
                out
            }
            "guest-fsfreeze-freeze" => {
                match behaviour {
                    FreezeBehaviour::Hang => continue,
                    FreezeBehaviour::HoldFirst(d) if first_freeze => {
                        st.lock().unwrap().frozen = true;
                        std::thread::sleep(d);
                    }
                    _ => st.lock().unwrap().frozen = true,
                }
                json!({"return": 1}).to_string().into_bytes()
            }
            "guest-fsfreeze-thaw" => {
                let was = std::mem::replace(&mut st.lock().unwrap().frozen, false);
                json!({"return": u32::from(was)}).to_string().into_bytes()
            }
            "guest-fsfreeze-status" => {
                let s = if st.lock().unwrap().frozen {
                    "frozen"
                } else {
                    "thawed"
                };
                json!({"return": s}).to_string().into_bytes()
            }
            "guest-ping" => json!({"return": {}}).to_string().into_bytes(),
            _ => json!({"error": {"class": "CommandNotFound", "desc": cmd}})
                .to_string()
                .into_bytes(),
        };
        let mut reply = reply;
        reply.push(b'\n');
        if w.write_all(&reply).is_err() {
            return;
        }
    }
}
