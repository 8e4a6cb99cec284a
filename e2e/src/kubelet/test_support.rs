//! Helpers for the tests that need root: throwaway network namespaces that are deleted even
//! when the test fails.
use std::process::Command;

/// Whether the test can run; prints why not otherwise.
pub fn root_or_skip(test: &str) -> bool {
    let is_root = nix::unistd::geteuid().is_root();
    if !is_root {
        eprintln!("skipping {test}: it creates network namespaces and needs root");
    }
    is_root
}

/// Runs `ip` and returns its stdout; panics with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Namespaces named `vk<pid><tag>-<role>`, unique per process and test, all deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    prefix: String,
    created: std::sync::Mutex<Vec<String>>,
}

impl NetnsGuard {
    pub fn new(tag: &str) -> Self {
        Self {
            prefix: format!("vk{}{tag}", std::process::id()),
            created: std::sync::Mutex::default(),
        }
    }

    /// A name under this guard's prefix, for namespaces the code under test creates itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates `<prefix>-<role>` with `lo` up.
    pub fn add(&self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        self.track(&name);
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Deletes `name` on drop too (for namespaces made by the code under test).
    pub fn track(&self, name: &str) {
        if let Ok(mut created) = self.created.lock() {
            created.push(name.to_owned());
        }
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let created = self
            .created
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for name in created {
            if std::path::Path::new("/run/netns").join(&name).exists() {
                // Best-effort: a failing cleanup must not hide the test's own failure.
                let _ = Command::new("ip").args(["netns", "delete", &name]).status();
            }
        }
    }
}
