//! Polling helpers for end-to-end tests: wait until an object satisfies a
//! predicate, with a bounded timeout and a useful message when it does not.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

/// Polls `name` until `pred` holds; returns the object. Fails after `timeout`
/// with the last state seen.
pub async fn until<K, F>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: F,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    F: Fn(&K) -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match api.get_opt(name).await {
            Ok(Some(obj)) if pred(&obj) => return Ok(obj),
            Ok(Some(obj)) => format!("{obj:#?}"),
            Ok(None) => "not found".into(),
            Err(e) => format!("error: {e}"),
        };
        if Instant::now() > deadline {
            bail!("{name}: timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until `name` is gone.
pub async fn gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = Instant::now() + timeout;
    loop {
        match api.get_opt(name).await? {
            None => return Ok(()),
            Some(obj) if Instant::now() > deadline => {
                bail!("{name} still exists after {timeout:?}: {obj:#?}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Polls a plain condition.
pub async fn condition<F: FnMut() -> bool>(timeout: Duration, what: &str, mut f: F) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
