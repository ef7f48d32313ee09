//! A small local stand-in for the Kubernetes API server: Node list and watch
//! (resource versions, a watch that ends, 410 Gone after history expires),
//! get, and the strategic-merge patch of `nodes/<name>/status`. It listens on
//! 127.0.0.1 inside a test namespace, where the agent under test runs.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::netns::{Netns, enter};

#[derive(Default)]
struct ApiState {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object) for watches.
    events: Vec<(u64, &'static str, Value)>,
    /// Watches from before this resource version get 410 Gone.
    oldest_rv: u64,
    /// Bumped to end every open watch.
    watch_generation: u64,
    patches: Vec<(String, Value)>,
    lists: usize,
    watches: usize,
    /// Every request answered 503 until then (an API server outage).
    unavailable_until: Option<Instant>,
}

type Shared = Arc<(Mutex<ApiState>, Condvar)>;

pub struct FakeApi {
    state: Shared,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub port: u16,
}

impl FakeApi {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<FakeApi> {
        let state: Shared = Arc::new((Mutex::new(ApiState::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/run/netns/{}", ns.name);
        let (tx, rx) = std::sync::mpsc::channel();
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let listener = enter(&path).and_then(|_| {
                let l = TcpListener::bind(("127.0.0.1", port)).context("bind")?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        std::thread::spawn(move || serve(conn, st, sp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("fake API did not start")??;
        Ok(FakeApi {
            state,
            stop,
            thread: Some(thread),
            port,
        })
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.port
        )
    }

    fn with<T>(&self, f: impl FnOnce(&mut ApiState) -> T) -> T {
        let (m, cv) = &*self.state;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut s);
        cv.notify_all();
        out
    }

    /// Create or replace a node (ADDED / MODIFIED).
    pub fn put_node(&self, node: Value) {
        self.with(|s| upsert(s, node));
    }

    pub fn delete_node(&self, name: &str) {
        self.with(|s| {
            if let Some(mut n) = s.nodes.remove(name) {
                s.rv += 1;
                n["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                let rv = s.rv;
                s.events.push((rv, "DELETED", n));
            }
        });
    }

    /// End every open watch (clients re-watch from their last version).
    pub fn end_watches(&self) {
        self.with(|s| s.watch_generation += 1);
    }

    /// Forget the event history: a watch from an older version gets 410 Gone.
    pub fn expire_history(&self) {
        self.with(|s| {
            // Compacted past every version a client has seen.
            s.oldest_rv = s.rv + 1;
            s.events.clear();
            s.watch_generation += 1;
        });
    }

    /// An outage: open watches end and every request is answered 503 for `d`.
    pub fn unavailable_for(&self, d: Duration) {
        self.with(|s| {
            s.unavailable_until = Some(Instant::now() + d);
            s.watch_generation += 1;
        });
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.with(|s| s.nodes.get(name).cloned())
    }

    pub fn patches(&self) -> Vec<(String, Value)> {
        self.with(|s| s.patches.clone())
    }

    pub fn lists(&self) -> usize {
        self.with(|s| s.lists)
    }

    pub fn watches(&self) -> usize {
        self.with(|s| s.watches)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn upsert(s: &mut ApiState, mut node: Value) {
    let name = node["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = if s.nodes.contains_key(&name) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    s.rv += 1;
    node["apiVersion"] = json!("v1");
    node["kind"] = json!("Node");
    node["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    s.nodes.insert(name, node.clone());
    let rv = s.rv;
    s.events.push((rv, kind, node));
}

/// A Node object as a test writes it.
pub fn node(name: &str, pod_cidr: &str, annotations: &[(&str, &str)]) -> Value {
    let ann: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    json!({
        "metadata": {"name": name, "annotations": ann},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"conditions": []},
    })
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        body,
    })
}

fn respond(w: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = if code == 200 { "OK" } else { "Error" };
    write!(
        w,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn serve(conn: TcpStream, state: Shared, stop: Arc<AtomicBool>) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    while let Some(req) = read_request(&mut r) {
        let down = {
            let (m, _) = &*state;
            let s = m.lock().unwrap_or_else(|p| p.into_inner());
            s.unavailable_until.is_some_and(|t| Instant::now() < t)
        };
        if down {
            let _ = respond(
                &mut w,
                503,
                &status(
                    503,
                    "ServiceUnavailable",
                    "the API server is down (test outage)",
                ),
            );
            continue;
        }
        let ok = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api/v1/nodes")
                if req
                    .query
                    .get("watch")
                    .is_some_and(|v| v == "true" || v == "1") =>
            {
                watch(&mut w, &req, &state, &stop);
                return; // a watch ends its connection
            }
            ("GET", "/api/v1/nodes") => {
                let (m, _) = &*state;
                let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
                s.lists += 1;
                let list = json!({"kind": "NodeList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": s.rv.to_string()},
                    "items": s.nodes.values().cloned().collect::<Vec<_>>()});
                drop(s);
                respond(&mut w, 200, &list)
            }
            ("GET", p) if p.starts_with("/api/v1/nodes/") => {
                let name = &p["/api/v1/nodes/".len()..];
                let (m, _) = &*state;
                let n = m
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .nodes
                    .get(name)
                    .cloned();
                match n {
                    Some(n) => respond(&mut w, 200, &n),
                    None => respond(
                        &mut w,
                        404,
                        &status(404, "NotFound", &format!("nodes \"{name}\" not found")),
                    ),
                }
            }
            ("PATCH", p) if p.starts_with("/api/v1/nodes/") && p.ends_with("/status") => {
                let name = p["/api/v1/nodes/".len()..p.len() - "/status".len()].to_string();
                let patch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                let (m, cv) = &*state;
                let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
                s.patches.push((name.clone(), patch.clone()));
                let Some(mut n) = s.nodes.get(&name).cloned() else {
                    drop(s);
                    let _ = respond(&mut w, 404, &status(404, "NotFound", "no such node"));
                    continue;
                };
                if let Some(a) = patch["metadata"]["annotations"].as_object() {
                    for (k, v) in a {
                        n["metadata"]["annotations"][k] = v.clone();
                    }
                }
                if let Some(conds) = patch["status"]["conditions"].as_array() {
                    let mut have: Vec<Value> = n["status"]["conditions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    for c in conds {
                        have.retain(|h| h["type"] != c["type"]);
                        have.push(c.clone());
                    }
                    n["status"]["conditions"] = json!(have);
                }
                upsert(&mut s, n.clone());
                let n = s.nodes.get(&name).cloned().unwrap_or(n);
                drop(s);
                cv.notify_all();
                respond(&mut w, 200, &n)
            }
            _ => respond(
                &mut w,
                404,
                &status(404, "NotFound", "not served by the fake API"),
            ),
        };
        if ok.is_err() {
            return;
        }
    }
}

fn chunk(w: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let text = format!("{v}\n");
    write!(w, "{:x}\r\n{text}\r\n", text.len())?;
    w.flush()
}

fn watch(w: &mut TcpStream, req: &Request, state: &Shared, stop: &AtomicBool) {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60u64)
        .min(60);
    let (m, cv) = &**state;
    let generation = {
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        s.watches += 1;
        s.watch_generation
    };
    if write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let gone = m.lock().map(|s| from < s.oldest_rv).unwrap_or(false);
    if gone {
        let _ = chunk(
            w,
            &json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}),
        );
        let _ = write!(w, "0\r\n\r\n");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut last = from;
    loop {
        let batch: Vec<(u64, &str, Value)> = {
            let s = m.lock().unwrap_or_else(|p| p.into_inner());
            if s.watch_generation != generation
                || stop.load(Ordering::Relaxed)
                || Instant::now() >= deadline
            {
                break;
            }
            let batch: Vec<_> = s
                .events
                .iter()
                .filter(|(rv, _, _)| *rv > last)
                .cloned()
                .collect();
            if batch.is_empty() {
                let _ = cv.wait_timeout(s, Duration::from_millis(100));
                continue;
            }
            batch
        };
        for (rv, kind, obj) in batch {
            if chunk(w, &json!({"type": kind, "object": obj})).is_err() {
                return;
            }
            last = rv;
        }
    }
    let _ = write!(w, "0\r\n\r\n");
}
