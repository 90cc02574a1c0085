//! SIGHUP: re-read the config file and apply to the running groups what can change at run time
//! (the settings `gkmctl policy --set` takes: [`GroupPolicy::RUNTIME_KEYS`]), logging each
//! change. A file that does not load, or a group in it whose policy is invalid, is refused as a
//! whole: nothing changes. What needs a restart (listen addresses, storage, a group added or
//! removed, the tree's shape, multicast, enrollment: its mode or its number of keys or tokens) is logged as such and not applied.

use std::path::Path;

use gkm_server::{Command, GroupPolicy, control::Reply};
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::queue::{ControllerQueue, ToController};

/// Reloads from `path` against `running` (the config served so far, replaced by the new one
/// when it loads). Returns how many settings changed, or `None` if the file was refused.
pub(crate) async fn reload(
    path: &Path,
    running: &mut Config,
    queue: &ControllerQueue,
) -> Option<usize> {
    let new = match load(path) {
        Ok(new) => new,
        Err(e) => {
            error!(
                "SIGHUP: refused {}, nothing changed: {e:#}; fix the file (`gkm-server \
                 check-config --config {}` says what is wrong) and send SIGHUP again",
                path.display(),
                path.display()
            );
            return None;
        }
    };
    info!("SIGHUP: reloading {}", path.display());
    restart_only(running, &new.0);
    let mut changed = 0;
    for policy in &new.1 {
        changed += apply(policy, queue).await;
    }
    info!(
        "SIGHUP: reloaded {}: {changed} setting(s) changed",
        path.display()
    );
    *running = new.0;
    Some(changed)
}

/// The file and every group's policy, or why it cannot be served.
fn load(path: &Path) -> anyhow::Result<(Config, Vec<GroupPolicy>)> {
    let config = Config::load(path)?;
    let policies = config
        .groups
        .iter()
        .map(crate::config::GroupConfig::policy)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((config, policies))
}

/// Logs each difference between `old` and `new` that only a restart applies.
fn restart_only(old: &Config, new: &Config) {
    let restart = |what: &str| warn!("SIGHUP: {what} changed; restart gkm-server to apply it");
    if old.listen != new.listen {
        restart("listen");
    }
    if old.metrics != new.metrics {
        restart("metrics");
    }
    if old.max_connections != new.max_connections {
        restart("max_connections");
    }
    if format!("{:?}", old.storage) != format!("{:?}", new.storage) {
        restart("[storage]");
    }
    for g in &new.groups {
        if !old.groups.iter().any(|o| o.name == g.name) {
            warn!(group = %g.name, "SIGHUP: a new group; restart gkm-server to serve it");
        }
    }
    for o in &old.groups {
        if !new.groups.iter().any(|g| g.name == o.name) {
            warn!(
                group = %o.name,
                "SIGHUP: removed from the config but still served; restart gkm-server to stop \
                 serving it"
            );
        }
    }
}

/// Sets each runtime setting of `policy` that differs from the running group's; logs the rest.
async fn apply(policy: &GroupPolicy, queue: &ControllerQueue) -> usize {
    let group = policy.name.clone();
    let current = command(queue, Command::Policy(group.clone(), None)).await;
    let Some(current) = current.data.filter(|_| current.ok) else {
        // A group not served here (new, or led by another controller): said already or below.
        if let Some(e) = current.error.filter(|e| !e.contains("unknown group")) {
            warn!(group = %group, "SIGHUP: not reloaded: {e}");
        }
        return 0;
    };
    let mut changed = 0;
    for key in GroupPolicy::RUNTIME_KEYS {
        let (old, new) = (text(&current[key]), runtime_value(policy, key));
        if old == new {
            continue;
        }
        let reply = command(
            queue,
            Command::Policy(group.clone(), Some((key.to_owned(), new.clone()))),
        )
        .await;
        if reply.ok {
            info!(group = %group, key, old = %old, new = %new, "SIGHUP: policy changed");
            changed += 1;
        } else {
            warn!(
                group = %group,
                key,
                "SIGHUP: could not change: {}",
                reply.error.unwrap_or_default()
            );
        }
    }
    let fixed = [
        ("degree", Value::from(policy.tree.degree)),
        ("one_way", Value::from(policy.tree.one_way)),
        (
            "hash_forward_joins",
            Value::from(policy.tree.hash_forward_joins),
        ),
        ("fanout", Value::from(policy.fanout)),
        (
            "rekey_address",
            policy
                .rekey_address
                .map_or(Value::Null, |a| Value::from(a.to_string())),
        ),
    ];
    for (key, new) in fixed {
        if current[key] != new {
            warn!(group = %group, key, "SIGHUP: fixed while the group runs; restart gkm-server to apply it");
        }
    }
    if current["enrollment"] != policy_enrollment(policy) {
        warn!(group = %group, "SIGHUP: enrollment changed; restart gkm-server to apply it");
    }
    changed
}

/// The enrollment as the controller shows it (mode and counts).
fn policy_enrollment(policy: &GroupPolicy) -> Value {
    match &policy.enrollment {
        gkm_server::Enrollment::Open => serde_json::json!({ "mode": "open" }),
        gkm_server::Enrollment::Restricted { allowed, tokens } => serde_json::json!({
            "mode": "restricted",
            "keys": allowed.len(),
            "tokens": tokens.len(),
        }),
    }
}

/// A runtime setting's value in `policy`, as `gkmctl policy --set` takes it.
fn runtime_value(policy: &GroupPolicy, key: &str) -> String {
    match key {
        "batch_interval_ms" => policy.batch_interval_ms.to_string(),
        "heartbeat_interval_ms" => policy.heartbeat_interval_ms.to_string(),
        "lease_ms" => policy.lease_ms.to_string(),
        "refresh_interval_ms" => policy.refresh_interval_ms.to_string(),
        "repeats" => policy.repeats.to_string(),
        "repeat_spacing_ms" => policy.repeat_spacing_ms.to_string(),
        "mtu" => policy.mtu.to_string(),
        "freshness_window_ms" => policy.freshness_window_ms.to_string(),
        "kem" => policy
            .kems
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(","),
        _ => String::new(),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        // A list (the KEMs) as `--set` takes it: items separated by commas.
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// One command through the controller's queue, as the control socket sends it.
async fn command(queue: &ControllerQueue, command: Command) -> Reply {
    let (reply, answer) = oneshot::channel();
    if !queue.send(ToController::Command { command, reply }) {
        return Reply::error("gkm-server is stopping");
    }
    answer
        .await
        .unwrap_or_else(|_| Reply::error("gkm-server is stopping"))
}
