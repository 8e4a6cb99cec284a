//! What the agent puts on its node before and after it serves: the CNI plugins (copied from the
//! agent's image into the host's CNI bin directory) and, in default-CNI mode, the conflist that
//! makes VirtNet the node's network (seed 000's: macvlan + virtnet-ipam + virtnet-coordinator).
//!
//! Every file is written next to its destination and renamed over it, so kubelet never runs a
//! half-copied plugin or reads a half-written conflist; a file already identical is left alone.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugins the agent installs, found next to the `virtnet` binary in the image.
pub const PLUGINS: [&str; 2] = ["virtnet-ipam", "virtnet-coordinator"];
/// Sorts first in /etc/cni/net.d, so the runtime takes it as the default network.
pub const CONFLIST_NAME: &str = "00-virtnet.conflist";

/// A file that could not be installed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot install {}: {source}; the agent needs the host's CNI directories mounted read-write",
    path.display()
)]
pub struct InstallError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Seed 000's conflist: macvlan on `master` with virtnet-ipam (default Subnet `subnet`, agent at
/// `socket`), then virtnet-coordinator.
pub fn default_conflist(master: &str, subnet: &str, socket: &Path) -> Value {
    json!({
        // As in seed 000 (and the README), which users compare it with.
        "cniVersion": "0.3.1",
        "name": "macvlan",
        "plugins": [
            {
                "type": "macvlan", "master": master, "mode": "bridge",
                "ipam": {"type": "virtnet-ipam", "default_subnet": subnet, "agent_socket": socket},
            },
            {"type": "virtnet-coordinator"},
        ],
    })
}

/// Writes `contents` to `destination` with `mode` by rename, unless it already holds exactly
/// that. Returns whether it wrote.
pub fn install_file(destination: &Path, contents: &[u8], mode: u32) -> Result<bool, InstallError> {
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| InstallError { path, source }
    };
    if fs::read(destination).is_ok_and(|current| current == contents) {
        return Ok(false);
    }
    let directory = destination.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(directory).map_err(failed(directory))?;
    let name = destination
        .file_name()
        .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
    let staged = directory.join(format!(".{name}.virtnet-staged"));
    let written = stage(&staged, contents, mode).and_then(|()| fs::rename(&staged, destination));
    if let Err(source) = written {
        // Best effort: a leftover is overwritten by the next attempt anyway.
        let _ = fs::remove_file(&staged);
        return Err(InstallError {
            path: destination.to_owned(),
            source,
        });
    }
    Ok(true)
}

/// Writes the complete file at `staged` (synced, with `mode`) for the rename.
fn stage(staged: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = fs::File::create(staged)?;
    file.write_all(contents)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.sync_all()
}

/// Copies [`PLUGINS`] from `source_dir` into `cni_bin_dir` (mode 0755). Returns the ones written.
pub fn install_plugins(
    source_dir: &Path,
    cni_bin_dir: &Path,
) -> Result<Vec<&'static str>, InstallError> {
    let mut written = Vec::new();
    for plugin in PLUGINS {
        let source = source_dir.join(plugin);
        let binary = fs::read(&source).map_err(|error| InstallError {
            path: source.clone(),
            source: error,
        })?;
        if install_file(&cni_bin_dir.join(plugin), &binary, 0o755)? {
            written.push(plugin);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_are_copied_once_and_nothing_is_left_behind() -> Result<(), Box<dyn std::error::Error>>
    {
        let image = tempfile::tempdir()?;
        let host = tempfile::tempdir()?;
        for plugin in PLUGINS {
            fs::write(
                image.path().join(plugin),
                format!("#!/bin/sh\n# {plugin}\n"),
            )?;
        }
        let bin = host.path().join("opt/cni/bin");
        assert_eq!(install_plugins(image.path(), &bin)?, PLUGINS);
        assert_eq!(
            install_plugins(image.path(), &bin)?,
            Vec::<&str>::new(),
            "already there"
        );
        let mut names: Vec<String> = fs::read_dir(&bin)?
            .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        assert_eq!(
            names,
            ["virtnet-coordinator", "virtnet-ipam"],
            "no staging files"
        );
        let mode = fs::metadata(bin.join("virtnet-ipam"))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o755);

        // A new image replaces the plugin (by rename: a running copy keeps its old inode).
        fs::write(image.path().join("virtnet-ipam"), "#!/bin/sh\n# newer\n")?;
        assert_eq!(install_plugins(image.path(), &bin)?, ["virtnet-ipam"]);
        assert_eq!(
            fs::read_to_string(bin.join("virtnet-ipam"))?,
            "#!/bin/sh\n# newer\n"
        );
        Ok(())
    }

    #[test]
    fn a_missing_plugin_says_which_file() -> Result<(), Box<dyn std::error::Error>> {
        let image = tempfile::tempdir()?;
        let host = tempfile::tempdir()?;
        let error = install_plugins(image.path(), host.path()).expect_err("nothing to copy");
        assert!(error.to_string().contains("virtnet-ipam"), "{error}");
        Ok(())
    }

    #[test]
    fn the_default_conflist_is_seed_000s() -> Result<(), Box<dyn std::error::Error>> {
        let conflist =
            default_conflist("ens192", "subnet", Path::new("/var/run/virtnet/agent.sock"));
        assert_eq!(conflist["plugins"][0]["master"], "ens192");
        assert_eq!(conflist["plugins"][0]["ipam"]["default_subnet"], "subnet");
        assert_eq!(
            conflist["plugins"][0]["ipam"]["agent_socket"],
            "/var/run/virtnet/agent.sock"
        );
        assert_eq!(conflist["plugins"][1]["type"], "virtnet-coordinator");
        let conf = tempfile::tempdir()?;
        let path = conf.path().join(CONFLIST_NAME);
        let text = format!("{conflist:#}\n");
        assert!(install_file(&path, text.as_bytes(), 0o644)?);
        assert!(!install_file(&path, text.as_bytes(), 0o644)?);
        assert_eq!(fs::read_to_string(&path)?, text);
        Ok(())
    }
}
