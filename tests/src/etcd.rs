//! A real etcd server (Debian's etcd-server) for etcd-mode tests, started on
//! the loopback of a test namespace with a temporary data directory.
use std::{
    path::{Path, PathBuf},
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
    /// Serve clients over TLS and require a client certificate.
    pub tls: Option<EtcdTls>,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with openssl for one test.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    pub fn generate(dir: &Path) -> anyhow::Result<EtcdTls> {
        std::fs::create_dir_all(dir)?;
        let d = dir.display();
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let script = format!(
            "set -e; cd {d}
openssl req -x509 {key} -keyout ca.key -out ca.pem -days 1 -subj /CN=flannel-test-ca
openssl req {key} -keyout server.key -out server.csr -subj /CN=etcd
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile server.ext
openssl req {key} -keyout client.key -out client.csr -subj /CN=flannel
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 -extfile client.ext"
        );
        crate::sh(&script)
            .context("making test certificates with openssl (apt-get install openssl)")?;
        Ok(EtcdTls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }

    fn client_options(&self) -> anyhow::Result<etcd_client::TlsOptions> {
        let ca = std::fs::read(&self.ca)?;
        let cert = std::fs::read(&self.client_cert)?;
        let key = std::fs::read(&self.client_key)?;
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .identity(etcd_client::Identity::from_pem(cert, key)))
    }
}

impl Etcd {
    /// Start etcd inside namespace `ns`, listening on 127.0.0.1:`port`.
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Etcd> {
        Etcd::start_with(ns, port, None)
    }

    /// Start etcd serving clients over TLS with client certificates required.
    pub fn start_tls(ns: &Netns, port: u16, tls: EtcdTls) -> anyhow::Result<Etcd> {
        Etcd::start_with(ns, port, Some(tls))
    }

    fn start_with(ns: &Netns, port: u16, tls: Option<EtcdTls>) -> anyhow::Result<Etcd> {
        let data_dir = std::env::temp_dir().join(format!("flannel-etcd-{}", ns.name));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut e = Etcd {
            ns: ns.name.clone(),
            data_dir,
            port,
            peer_port: port + 1,
            child: None,
            tls,
        };
        e.spawn()?;
        Ok(e)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
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
            // Plain-HTTP /health whatever the client side speaks.
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", peer + 1),
            ])
            .args(self.tls.iter().flat_map(|t| {
                [
                    "--cert-file".into(),
                    t.server_cert.clone().into_os_string(),
                    "--key-file".into(),
                    t.server_key.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    t.ca.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        self.child = Some(child);
        let health = peer + 1;
        let ns = self.ns.clone();
        wait_for("etcd to answer", Duration::from_secs(20), || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{health} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"))
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
        self.client_as(ns, None, f)
    }

    /// Client calls as `user` (name, password), over TLS when the server speaks it.
    pub fn client_as<T: Send>(
        &self,
        ns: &Netns,
        user: Option<(&str, &str)>,
        f: impl AsyncFnOnce(&mut etcd_client::Client) -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let ep = self.endpoint();
        let mut opts = etcd_client::ConnectOptions::new();
        if let Some(t) = &self.tls {
            opts = opts.with_tls(t.client_options()?);
        }
        if let Some((u, p)) = user {
            opts = opts.with_user(u, p);
        }
        ns.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut c = etcd_client::Client::connect([ep.as_str()], Some(opts)).await?;
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
