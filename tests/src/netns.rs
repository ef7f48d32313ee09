//! Network namespaces that remove themselves, and running code inside them.
use std::{fs::File, os::fd::AsRawFd};

use anyhow::Context;

use crate::sh;

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        // A leftover from a crashed run of the same test would make `add` fail.
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        sh(&format!("ip netns add {name}"))?;
        let ns = Netns { name: name.into() };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// Run a shell command line inside the namespace.
    pub fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }

    /// Run a shell command line inside the namespace with /sys/fs/bpf visible
    /// (`ip netns exec` remounts /sys).
    pub fn nsenter(&self, cmd: &str) -> anyhow::Result<String> {
        sh(&format!("nsenter --net=/run/netns/{} {cmd}", self.name))
    }

    /// Run `f` on a thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<T> {
                enter(&path)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {path} panicked"))?
        })
    }
}

/// Move the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns {path}"));
    }
    Ok(())
}

impl Netns {
    /// `GET path` on 127.0.0.1:`port` inside the namespace: the raw response.
    pub fn http_get(&self, port: u16, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        self.run(|| -> anyhow::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}
