//! A real etcd server (Debian's etcd-server) for etcd-mode tests, started on
//! the loopback of a test namespace with a temporary data directory.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context;

use crate::{netns::Netns, wait_for};

pub struct Etcd {
    ns: String,
    pub data_dir: PathBuf,
    pub port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Start etcd inside namespace `ns`, listening on 127.0.0.1:`port`.
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Etcd> {
        let data_dir = std::env::temp_dir().join(format!("flannel-etcd-{}", ns.name));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut e = Etcd {
            ns: ns.name.clone(),
            data_dir,
            port,
            peer_port: port + 1,
            child: None,
        };
        e.spawn()?;
        Ok(e)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        // The peer port stays put: it is recorded in the data directory.
        let peer = self.peer_port;
        let log = std::fs::File::create(self.data_dir.with_extension("log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcd", "--name", "test"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("test=http://127.0.0.1:{peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        self.child = Some(child);
        let ep = self.endpoint();
        let ns = self.ns.clone();
        wait_for("etcd to answer", Duration::from_secs(20), || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3", ep.rsplit(':').next().unwrap_or("2379")))
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("\"health\":\"true\"")
                .then_some(())
        })?;
        Ok(())
    }

    /// Stop the server (SIGKILL: as abrupt as a lost connection gets).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Start it on the same data but another client port, which agents
    /// configured with the usual endpoint cannot see.
    pub fn restart_on(&mut self, port: u16) -> anyhow::Result<()> {
        self.stop();
        self.port = port;
        self.spawn()
    }

    /// Run etcd client calls from inside the namespace.
    pub fn client<T: Send>(
        &self,
        ns: &Netns,
        f: impl AsyncFnOnce(&mut etcd_client::Client) -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let ep = self.endpoint();
        ns.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut c = etcd_client::Client::connect([ep.as_str()], None).await?;
                f(&mut c).await
            })
        })?
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(self.data_dir.with_extension("log"));
    }
}
