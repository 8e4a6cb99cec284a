//! Long-running components started detached, so a sandbox outlives the `virtnet-e2e up` that
//! started it, and stopped again from nothing but the pid files they left in the state directory.
use std::{
    ffi::OsString,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::{
    command,
    netns::{NetnsError, named_netns_path, run_in_netns},
};

/// How long killed components may take to disappear before `down` moves on regardless.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// A component could not be started or its pid file not be handled.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {component} (`{command}`): {source}")]
    Spawn {
        component: String,
        command: String,
        source: std::io::Error,
    },
    #[error("cannot start {component}: {source}")]
    Netns {
        component: String,
        source: NetnsError,
    },
    #[error("cannot write pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the pid directory {path}: {source}")]
    PidDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One long-running component of the cluster.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Names the log file `<logs>/<name>.log` and the pid file `<pids>/<name>.pid`.
    pub name: String,
    /// The network namespace it runs in; `None` for the root namespace (the API forwarder).
    pub netns: Option<String>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl Daemon {
    pub fn new(
        name: impl Into<String>,
        netns: Option<String>,
        program: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            netns,
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// The same component with `env` added to its environment: it runs as
    /// `env KEY=VALUE... <program> <args>`, so a variable the component's own `env` wrapper also
    /// sets keeps that wrapper's value.
    pub fn with_env(&self, env: &[(&str, &str)]) -> Self {
        let mut args: Vec<OsString> = env
            .iter()
            .map(|(key, value)| OsString::from(format!("{key}={value}")))
            .collect();
        args.push(self.program.clone().into_os_string());
        args.extend(self.args.iter().cloned());
        Self {
            name: self.name.clone(),
            netns: self.netns.clone(),
            program: PathBuf::from("env"),
            args,
        }
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the component in its own session, output appended to `<log_dir>/<name>.log`, and
    /// records it in `<pid_dir>/<name>.pid`. The returned child is only for reaping.
    ///
    /// It joins the network namespace through a thread that entered it rather than through
    /// `ip netns exec`: the latter also gives the process a private mount namespace, and network
    /// namespaces that the kubelet stand-in bind-mounts there would be invisible to everyone else.
    pub fn start(&self, log_dir: &Path, pid_dir: &Path) -> Result<Child, ProcessError> {
        let log_path = log_dir.join(format!("{}.log", self.name));
        let open_log = || {
            File::options()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|source| ProcessError::Log {
                    path: log_path.clone(),
                    source,
                })
        };
        // `setsid`: a session and process group of its own, so the component survives the
        // terminal that ran `make sandbox` and its whole group can be signalled at once.
        let mut command = Command::new("setsid");
        command
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?);
        let description = command::describe(&command);
        let spawn_error = |source| ProcessError::Spawn {
            component: self.name.clone(),
            command: description.clone(),
            source,
        };
        let child = match &self.netns {
            None => command.spawn().map_err(spawn_error)?,
            Some(netns) => run_in_netns(named_netns_path(netns), move || command.spawn())
                .map_err(|source| ProcessError::Netns {
                    component: self.name.clone(),
                    source,
                })?
                .map_err(spawn_error)?,
        };
        record_pid(pid_dir, &self.name, child.id())?;
        Ok(child)
    }
}

/// A pid file holds the pid and the process's start time, so a stale file never makes
/// `down` signal an unrelated process that reused the pid.
fn record_pid(pid_dir: &Path, name: &str, pid: u32) -> Result<(), ProcessError> {
    let path = pid_dir.join(format!("{name}.pid"));
    let start_time = process_start_time(pid).unwrap_or_default();
    fs::write(&path, format!("{pid} {start_time}\n"))
        .map_err(|source| ProcessError::PidFile { path, source })
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); `None` once it is gone
/// or only a zombie is left.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let after_name = stat.rsplit_once(')')?.1;
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `after_name` starts at field 3, so field 22 is the 20th from here.
    fields.nth(18)?.parse().ok()
}

/// The still-running process groups recorded in `pid_dir`.
fn recorded_groups(pid_dir: &Path) -> Result<Vec<u32>, ProcessError> {
    let entries = match fs::read_dir(pid_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ProcessError::PidDir {
                path: pid_dir.to_owned(),
                source,
            });
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|entry| running_group(&entry.path()))
        .collect())
}

/// The process group a pid file records, if that very process still runs.
fn running_group(pid_file: &Path) -> Option<u32> {
    let content = fs::read_to_string(pid_file).ok()?;
    let mut fields = content.split_whitespace();
    let pid: u32 = fields.next()?.parse().ok()?;
    let recorded_start: u64 = fields.next()?.parse().ok()?;
    (process_start_time(pid) == Some(recorded_start)).then_some(pid)
}

/// Kills every component recorded in `pid_dir` with its whole process group and waits for them
/// to disappear. SIGKILL rather than a graceful stop: the cluster's state is thrown away anyway,
/// and graceful apiserver and etcd shutdowns take seconds. Succeeds when nothing is recorded.
pub fn stop_recorded(pid_dir: &Path) -> Result<(), ProcessError> {
    kill_groups(&recorded_groups(pid_dir)?);
    Ok(())
}

/// Kills component `name` recorded in `pid_dir` as [`stop_recorded`] does and returns its pid;
/// `None` when it is not running.
pub fn stop_one(pid_dir: &Path, name: &str) -> Option<u32> {
    let group = running_group(&pid_dir.join(format!("{name}.pid")));
    kill_groups(&Vec::from_iter(group));
    group
}

/// SIGKILLs each process group and waits (at most [`EXIT_WAIT`]) for them to disappear.
fn kill_groups(groups: &[u32]) {
    for &pid in groups {
        if let Ok(pid) = i32::try_from(pid) {
            // ESRCH (already gone) is fine.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + EXIT_WAIT;
    while groups.iter().any(|&pid| process_start_time(pid).is_some()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Every descendant of `pids` (children, their children...), from /proc's parent links.
pub fn descendants(pids: &[i32]) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|pid| Some((pid, parent_pid(pid)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut found: Vec<i32> = Vec::new();
    let mut frontier: Vec<i32> = pids.to_vec();
    while let Some(parent) = frontier.pop() {
        for &(pid, _) in parents.iter().filter(|&&(_, ppid)| ppid == parent) {
            if !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

/// Field 4 of /proc/<pid>/stat.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Kills processes outright: used for stragglers found in a namespace about to be deleted.
pub fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
