//! SIGHUP: a running [`Server`] takes a new config. Everything that can fail (parsing, the
//! store, certificates, binding new ports) happens before anything changes, so a bad config
//! leaves the old one in force. Then the generation of settings is swapped, listeners are
//! added, changed in place (same socket, no gap) or closed, and the connection cap resized.
//! Open sessions keep the generation they were accepted under and are never dropped.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::server::{bind_one, context, server_tls, write, BoundListener, Listening};
use super::{App, ListenerCtx, Server};
use crate::config::{Config, ListenerConfig};

/// What a reload does with one listener of the new config.
enum Step {
    /// Keep accepting on the old listener at this index, with these settings.
    Keep(usize, Arc<ListenerCtx>),
    Bind(BoundListener),
}

impl Server {
    /// Re-read the config file and apply it; on any error nothing changes. Returns a summary.
    pub async fn reload_file(self: &Arc<Self>, path: &Path) -> Result<String, String> {
        let config = Config::load(path).map_err(|e| e.to_string())?;
        self.reload(config).await
    }

    /// Apply `config`; on any error nothing changes. Returns a summary.
    pub async fn reload(self: &Arc<Self>, config: Config) -> Result<String, String> {
        if config.listeners.is_empty() {
            return Err(format!(
                "{}: no [[listener]] configured",
                config.path.display()
            ));
        }
        // Held throughout: one reload at a time.
        let mut listeners = self.listeners.lock().await;
        let old = self.app();
        if config.admin.as_ref().map(|a| a.bind) != old.config.admin.as_ref().map(|a| a.bind) {
            tracing::warn!("[admin] bind changed: the admin listener moves at the next restart");
        }
        let app = old.reconfigured(config)?;
        let steps = plan(&listeners, &app.config)?;
        // Nothing below fails. New listeners start under the new settings.
        self.swap(app.clone());
        let mut old_listeners: Vec<Option<Listening>> = listeners.drain(..).map(Some).collect();
        let (mut kept, mut added) = (0, 0);
        for step in steps {
            listeners.push(match step {
                Step::Keep(i, ctx) => {
                    kept += 1;
                    let Some(mut l) = old_listeners[i].take() else {
                        continue;
                    };
                    if l.config != ctx.config {
                        tracing::info!(protocol = ctx.config.protocol.name(), bind = %l.addr, "listener settings changed; new connections get them");
                    }
                    l.config = ctx.config.clone();
                    *write(&l.ctx) = ctx;
                    l
                }
                Step::Bind(bound) => {
                    added += 1;
                    self.run(bound)
                }
            });
        }
        self.publish(&listeners);
        let mut closed = 0;
        for l in old_listeners.into_iter().flatten() {
            closed += 1;
            l.stop.cancel();
            let _ = l.task.await;
            tracing::info!(protocol = l.config.protocol.name(), bind = %l.addr, "stopped listening (removed from the config); its open sessions continue");
        }
        Ok(format!(
            "{} accounts; listeners: {kept} kept, {added} added, {closed} closed",
            app.config.accounts.len()
        ))
    }

    /// New connections get `app` from now on; its token refresher replaces the old one.
    fn swap(&self, app: Arc<App>) {
        let old = std::mem::replace(&mut *write(&self.app), app.clone());
        if let Some(peers) = app.registry.store().peers() {
            if !old.registry.store().same_as(app.registry.store()) {
                // A new shared store: its sessions' leases need renewing too.
                tokio::spawn(peers.clone().renew_leases_forever());
            }
        }
        let refresher = self.cancel.child_token();
        app.tokens.spawn_refresher(refresher.clone());
        let old = std::mem::replace(&mut *lock(&self.refresher), refresher);
        old.cancel();
        self.resize(app.config.limits.max_connections);
    }

    /// Resize the global connection cap. Shrinking below what is open retires permits as
    /// connections end; a later resize cancels that wait and counts from what retired.
    fn resize(&self, max: usize) {
        let mut capacity = lock(&self.capacity);
        capacity.shrinking.cancel();
        if max >= capacity.permits {
            self.permits.add_permits(max - capacity.permits);
            capacity.permits = max;
            return;
        }
        let excess = capacity.permits - max;
        let forgotten = self.permits.forget_permits(excess);
        capacity.permits -= forgotten;
        let owed = excess - forgotten;
        if owed == 0 {
            return;
        }
        let shrinking = CancellationToken::new();
        capacity.shrinking = shrinking.clone();
        let (permits, shared) = (self.permits.clone(), self.capacity.clone());
        tokio::spawn(async move {
            let n = u32::try_from(owed).unwrap_or(u32::MAX);
            tokio::select! {
                Ok(acquired) = permits.acquire_many_owned(n) => {
                    let mut capacity = lock(&shared);
                    // A resize since then counted without these: give them back.
                    if !shrinking.is_cancelled() {
                        acquired.forget();
                        capacity.permits -= owed;
                    }
                }
                _ = shrinking.cancelled() => {}
            }
        });
    }
}

/// Match the new listeners to the running ones (same settings, or the same fixed address)
/// and prepare each: new settings for the kept, a bound socket for the new.
fn plan(running: &[Listening], config: &Config) -> Result<Vec<Step>, String> {
    let tls = server_tls(config)?;
    let mut claimed = vec![false; running.len()];
    let mut steps = Vec::new();
    for l in &config.listeners {
        let found = running
            .iter()
            .enumerate()
            .position(|(i, r)| !claimed[i] && same_listener(&r.config, l));
        steps.push(match found {
            Some(i) => {
                claimed[i] = true;
                let ctx = context(l, tls.clone())?;
                let before = super::server::read(&running[i].ctx).clone();
                if before.config.upstream() == l.upstream()
                    && before.config.upstream_tls == l.upstream_tls
                {
                    if let Some(lines) = before.upstream_capabilities.get() {
                        ctx.upstream_capabilities.set(lines.to_vec());
                    }
                }
                Step::Keep(i, Arc::new(ctx))
            }
            None => Step::Bind(bind_one(l, tls.clone())?),
        });
    }
    Ok(steps)
}

/// The same listener: identical settings, or the same fixed address (its settings changed).
/// A port-0 listener is new unless identical, since its address is the OS's choice.
fn same_listener(running: &ListenerConfig, new: &ListenerConfig) -> bool {
    running == new || (new.bind.port() != 0 && running.bind == new.bind)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
