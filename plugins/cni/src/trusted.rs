//! Host paths a network config may name.
//!
//! A NetworkAttachmentDefinition is written by a namespace's user, but the plugins it names run
//! as root on the node. So a config may put the agent socket and the log file only under
//! directories the node's administrator trusts: the built-in [`DEFAULT_TRUSTED_DIRS`], plus
//! those listed in [`TRUSTED_DIRS_ENV`] in the container runtime's environment (which a tenant
//! cannot set). The check is lexical when the config is read (clear error, nothing done yet),
//! and the filesystem is checked again when the path is used: no symlink is followed, neither in
//! the file itself nor in a directory between the trusted one and the file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::error::CniError;
use crate::fields::{FieldReader, as_absolute_path};

/// Where VirtNet keeps its agent socket and plugin logs on every node.
pub const DEFAULT_TRUSTED_DIRS: [&str; 3] =
    ["/var/run/virtnet", "/run/virtnet", "/var/log/virtnet"];

/// The node agent's socket when a config names none.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/virtnet/agent.sock";

/// Colon-separated extra directories, set by the node's administrator in the container
/// runtime's environment (e.g. a test harness whose nodes keep their sockets elsewhere).
pub const TRUSTED_DIRS_ENV: &str = "VIRTNET_CNI_TRUSTED_DIRS";

/// The directories a config's paths must lie under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedDirs(Vec<PathBuf>);

impl Default for TrustedDirs {
    fn default() -> Self {
        Self(DEFAULT_TRUSTED_DIRS.iter().map(PathBuf::from).collect())
    }
}

impl TrustedDirs {
    /// The defaults plus the value of [`TRUSTED_DIRS_ENV`], whose entries must be absolute.
    pub fn with_extra(extra: Option<&str>) -> Result<Self, CniError> {
        let mut dirs = Self::default();
        for entry in extra.into_iter().flat_map(|value| value.split(':')) {
            if entry.is_empty() {
                continue;
            }
            let dir = PathBuf::from(entry);
            if !is_plain_absolute(&dir) {
                return Err(CniError::invalid_environment(format!(
                    "{TRUSTED_DIRS_ENV} entry {entry:?} must be an absolute directory without \
                     \".\" or \"..\" components"
                )));
            }
            dirs.0.push(dir);
        }
        Ok(dirs)
    }

    /// `path` as a [`TrustedPath`] if it names a file strictly inside one of the directories.
    pub fn admit(&self, path: &Path) -> Option<TrustedPath> {
        if !is_plain_absolute(path) {
            return None;
        }
        self.0
            .iter()
            .find(|dir| path.starts_with(dir) && path != dir.as_path())
            .map(|dir| TrustedPath {
                path: path.to_path_buf(),
                root: dir.clone(),
            })
    }

    /// Reads `key` as a path under these directories; the message of a refused one lists them
    /// and says how the node's administrator adds one.
    pub fn read_path(
        &self,
        fields: &mut FieldReader<'_>,
        key: &'static str,
        example: &str,
    ) -> Result<Option<TrustedPath>, CniError> {
        let expected = format!(
            "an absolute path under one of the node's trusted directories {} (more can be \
             listed in {TRUSTED_DIRS_ENV} in the container runtime's environment, never in a \
             network config), e.g. \"{example}\"",
            self.describe()
        );
        fields.get(key, &expected, |value: &Value| {
            as_absolute_path(value).and_then(|path| self.admit(path))
        })
    }

    /// The directories, for messages: `/var/run/virtnet, /run/virtnet, ...`.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|dir| dir.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A path a config named, known to lie (lexically) under the trusted directory `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedPath {
    path: PathBuf,
    root: PathBuf,
}

impl TrustedPath {
    /// [`DEFAULT_AGENT_SOCKET`], in the built-in directory it names.
    pub fn default_agent_socket() -> Self {
        let path = PathBuf::from(DEFAULT_AGENT_SOCKET);
        let root = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self { path, root }
    }

    pub fn as_path(&self) -> &Path {
        &self.path
    }

    /// Opens the file for appending, creating it (mode 0600) and its missing parent
    /// directories under the trusted root. A symlink anywhere below the root is refused.
    pub fn open_append(&self) -> io::Result<File> {
        if let Some(parent) = self.path.parent() {
            fs::create_dir_all(parent)?;
        }
        self.refuse_symlinked_parents()?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&self.path)
    }

    /// The path of a unix socket to connect to, after checking that it is a socket and that no
    /// symlink below the root leads to it.
    pub fn socket(&self) -> io::Result<&Path> {
        self.refuse_symlinked_parents()?;
        let kind = fs::symlink_metadata(&self.path)?.file_type();
        if kind.is_socket() {
            Ok(&self.path)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a unix socket", self.path.display()),
            ))
        }
    }

    /// Every directory between the root (exclusive) and the file must be a real directory.
    fn refuse_symlinked_parents(&self) -> io::Result<()> {
        let Ok(below) = self.path.strip_prefix(&self.root) else {
            return Ok(());
        };
        let mut current = self.root.clone();
        let directories = below.parent().into_iter().flat_map(Path::components);
        for component in directories {
            current.push(component);
            if fs::symlink_metadata(&current)?.file_type().is_symlink() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is a symlink; paths under {} must not go through symlinks",
                        current.display(),
                        self.root.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Absolute, and made of plain names only: no `.` or `..` that could climb out of a directory.
fn is_plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|component| matches!(component, Component::RootDir | Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn admits_files_strictly_inside_a_trusted_directory() {
        let dirs = TrustedDirs::default();
        assert!(
            dirs.admit(Path::new("/var/run/virtnet/agent.sock"))
                .is_some()
        );
        assert!(dirs.admit(Path::new("/var/log/virtnet/a/b.log")).is_some());
        for refused in [
            "/var/run/virtnet",
            "/etc/passwd",
            "/var/run/virtnet/../../etc/passwd",
            "/var/run/virtnetx/agent.sock",
            "var/run/virtnet/agent.sock",
        ] {
            assert_eq!(dirs.admit(Path::new(refused)), None, "{refused}");
        }
    }

    #[test]
    fn the_environment_adds_absolute_directories_only() -> Result<(), CniError> {
        let dirs = TrustedDirs::with_extra(Some("/tmp/node1::/srv/x"))?;
        assert!(dirs.admit(Path::new("/tmp/node1/run/agent.sock")).is_some());
        assert!(dirs.admit(Path::new("/srv/x/y")).is_some());
        assert!(
            dirs.describe()
                .ends_with("/var/log/virtnet, /tmp/node1, /srv/x")
        );
        let error = TrustedDirs::with_extra(Some("relative")).expect_err("relative entry");
        assert!(error.msg.contains(TRUSTED_DIRS_ENV), "{}", error.msg);
        Ok(())
    }

    #[test]
    fn opening_refuses_symlinks_in_the_file_and_its_directories() -> Result<(), Box<dyn Error>> {
        let root = tempfile::tempdir()?;
        let outside = tempfile::tempdir()?;
        let dirs = TrustedDirs::with_extra(root.path().to_str())?;
        let admit = |relative: &str| {
            dirs.admit(&root.path().join(relative))
                .ok_or("inside the trusted root")
        };

        admit("logs/ipam.log")?.open_append()?;
        assert!(root.path().join("logs/ipam.log").is_file());

        symlink(
            outside.path().join("target"),
            root.path().join("linked.log"),
        )?;
        assert!(admit("linked.log")?.open_append().is_err());
        assert!(!outside.path().join("target").exists());

        symlink(outside.path(), root.path().join("linked-dir"))?;
        assert!(admit("linked-dir/ipam.log")?.open_append().is_err());
        assert!(!outside.path().join("ipam.log").exists());
        Ok(())
    }

    #[test]
    fn a_socket_must_be_a_socket_reached_without_symlinks() -> Result<(), Box<dyn Error>> {
        let root = tempfile::tempdir()?;
        let dirs = TrustedDirs::with_extra(root.path().to_str())?;
        let socket = root.path().join("agent.sock");
        let _listener = UnixListener::bind(&socket)?;
        let admitted = dirs.admit(&socket).ok_or("inside the trusted root")?;
        assert_eq!(admitted.socket()?, socket.as_path());

        symlink(&socket, root.path().join("link.sock"))?;
        let link = dirs.admit(&root.path().join("link.sock")).ok_or("inside")?;
        assert!(link.socket().is_err());
        fs::write(root.path().join("plain"), "")?;
        let plain = dirs.admit(&root.path().join("plain")).ok_or("inside")?;
        assert!(plain.socket().is_err());
        Ok(())
    }
}
