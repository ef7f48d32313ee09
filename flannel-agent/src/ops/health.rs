//! What `/healthz` and `/readyz` answer, and the lease source's state for
//! logs and metrics: the control loop beats once per pass; readiness needs
//! the tables in place, the lease source reachable and the last pass clean.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the control loop's last pass.
    beat_ms: AtomicU64,
    /// How long without a pass means the loop is stuck.
    stale_after: Duration,
    /// Tables and subnet.env in place (start-up done).
    ready: AtomicBool,
    /// Why the lease source is degraded, if it is.
    source_down: Mutex<Option<String>>,
    /// Why the last pass could not keep the node's tables, if it could not.
    tables_down: Mutex<Option<String>>,
}

impl Health {
    pub fn new(stale_after: Duration) -> Health {
        Health {
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            stale_after,
            ready: AtomicBool::new(false),
            source_down: Mutex::new(None),
            tables_down: Mutex::new(None),
        }
    }

    pub fn beat(&self) {
        self.beat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.beat();
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Record the lease source's state; log each change once.
    pub fn set_source(&self, down: Option<String>) {
        let Ok(mut cur) = self.source_down.lock() else {
            return;
        };
        if *cur == down {
            return;
        }
        match &down {
            Some(why) => log::error!(
                "lease source degraded: {why}; the node keeps its tables and data path as they are"
            ),
            None => log::info!("lease source reachable again: converging"),
        }
        *cur = down;
    }

    pub fn source_up(&self) -> bool {
        self.source_down.lock().is_ok_and(|d| d.is_none())
    }

    pub fn set_tables(&self, down: Option<String>) {
        if let Ok(mut cur) = self.tables_down.lock() {
            *cur = down;
        }
    }

    /// `/healthz`: the control loop is alive.
    pub fn healthz(&self) -> (&'static str, String) {
        let now = self.started.elapsed();
        let last = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        let idle = now.saturating_sub(last);
        if self.ready.load(Ordering::Relaxed) && idle > self.stale_after {
            return (
                "503 Service Unavailable",
                format!(
                    "control loop stuck: no pass for {:.0}s\n",
                    idle.as_secs_f64()
                ),
            );
        }
        ("200 OK", "ok\n".into())
    }

    /// `/readyz`: the node's network is in place and being kept.
    pub fn readyz(&self) -> (&'static str, String) {
        if !self.ready.load(Ordering::Relaxed) {
            return (
                "503 Service Unavailable",
                "tables or subnet.env not in place yet\n".into(),
            );
        }
        for (what, m) in [
            ("lease source degraded", &self.source_down),
            ("tables cannot be kept", &self.tables_down),
        ] {
            if let Ok(g) = m.lock()
                && let Some(why) = g.as_ref()
            {
                return ("503 Service Unavailable", format!("{what}: {why}\n"));
            }
        }
        ("200 OK", "ready\n".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_when_the_loop_stops_beating() {
        let h = Health::new(Duration::from_millis(50));
        assert_eq!(h.healthz().0, "200 OK", "not started yet: alive");
        h.set_ready();
        assert_eq!(h.healthz().0, "200 OK");
        std::thread::sleep(Duration::from_millis(80));
        let (status, body) = h.healthz();
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.contains("control loop stuck"), "{body}");
        h.beat();
        assert_eq!(h.healthz().0, "200 OK");
    }

    #[test]
    fn readyz_names_what_is_wrong() {
        let h = Health::new(Duration::from_secs(60));
        assert!(h.readyz().1.contains("not in place yet"));
        h.set_ready();
        assert_eq!(h.readyz().0, "200 OK");
        h.set_source(Some("etcd: watch lost".into()));
        assert!(!h.source_up());
        let (status, body) = h.readyz();
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.contains("lease source degraded: etcd: watch lost"),
            "{body}"
        );
        h.set_source(None);
        h.set_tables(Some("3 table updates failed".into()));
        assert!(
            h.readyz()
                .1
                .contains("tables cannot be kept: 3 table updates failed")
        );
        h.set_tables(None);
        assert_eq!(h.readyz().0, "200 OK");
    }
}
