//! The `CNI_*` environment variables, parsed and validated per command into [`Inputs`].
//!
//! Parsing takes the variables as an iterator of pairs rather than reading the process
//! environment, so tests can hand in any environment without touching global state.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use crate::error::CniError;
use crate::trusted::{TRUSTED_DIRS_ENV, TrustedDirs};

const CNI_COMMAND: &str = "CNI_COMMAND";
const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
const CNI_NETNS: &str = "CNI_NETNS";
const CNI_IFNAME: &str = "CNI_IFNAME";
const CNI_ARGS: &str = "CNI_ARGS";
const CNI_PATH: &str = "CNI_PATH";
const READ_VARIABLES: [&str; 7] = [
    CNI_COMMAND,
    CNI_CONTAINERID,
    CNI_NETNS,
    CNI_IFNAME,
    CNI_ARGS,
    CNI_PATH,
    TRUSTED_DIRS_ENV,
];

/// The longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
const MAX_INTERFACE_NAME_LEN: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    const ALL: [Self; 6] = [
        Self::Add,
        Self::Del,
        Self::Check,
        Self::Version,
        Self::Gc,
        Self::Status,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Gc => "GC",
            Self::Status => "STATUS",
        }
    }

    /// DEL and GC release what an older config set up: a key this version does not know must
    /// not make them fail forever.
    pub const fn tolerates_unknown_keys(self) -> bool {
        matches!(self, Self::Del | Self::Gc)
    }

    fn parse(value: &str) -> Result<Self, CniError> {
        Self::ALL
            .into_iter()
            .find(|command| command.as_str() == value)
            .ok_or_else(|| {
                CniError::invalid_environment(format!(
                    "{CNI_COMMAND}={value:?} is not a CNI command; expected one of {}",
                    Self::ALL.map(Self::as_str).join(", ")
                ))
            })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// ADD and CHECK: an interface in a network namespace that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub args: CniArgs,
}

/// DEL: like [`Attachment`], but the runtime may call DEL after the namespace is gone, so
/// `netns` is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detachment {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
}

/// What the runtime asked for, with exactly the variables that command requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Add(Attachment),
    Del(Detachment),
    Check(Attachment),
    Version,
    /// GC and STATUS concern the whole network, not one container.
    Gc,
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    pub request: Request,
    /// `CNI_PATH`: where the runtime keeps plugin binaries (empty when unset).
    pub cni_path: Vec<PathBuf>,
    /// Where a config may put the agent socket and log files.
    pub trusted_dirs: TrustedDirs,
}

impl Inputs {
    /// Parses the variables of the current process.
    pub fn from_process_env() -> Result<Self, CniError> {
        Self::from_vars(std::env::vars_os())
    }

    /// Parses `CNI_*` variables from any `(name, value)` pairs; other variables are ignored.
    ///
    /// Errors are code 4 and name the variable to fix.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, CniError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let env = CniEnv::collect(vars)?;
        let command = Command::parse(env.get(CNI_COMMAND).ok_or_else(|| {
            CniError::invalid_environment(format!(
                "{CNI_COMMAND} is not set; the container runtime sets it to one of ADD, DEL, CHECK, \
                 VERSION, GC, STATUS when it runs a CNI plugin"
            ))
        })?)?;
        let request = match command {
            Command::Add => Request::Add(env.attachment(command)?),
            Command::Check => Request::Check(env.attachment(command)?),
            Command::Del => {
                let [container_id, ifname] = env.require(command, [CNI_CONTAINERID, CNI_IFNAME])?;
                Request::Del(Detachment {
                    container_id: valid_container_id(container_id)?,
                    netns: env.get(CNI_NETNS).map(valid_netns).transpose()?,
                    ifname: valid_ifname(ifname)?,
                    args: env.args()?,
                })
            }
            Command::Version => Request::Version,
            Command::Gc => Request::Gc,
            Command::Status => Request::Status,
        };
        let cni_path = env
            .get(CNI_PATH)
            .map(|paths| std::env::split_paths(paths).collect())
            .unwrap_or_default();
        let trusted_dirs = TrustedDirs::with_extra(env.get(TRUSTED_DIRS_ENV))?;
        Ok(Self {
            request,
            cni_path,
            trusted_dirs,
        })
    }

    pub fn command(&self) -> Command {
        match self.request {
            Request::Add(_) => Command::Add,
            Request::Del(_) => Command::Del,
            Request::Check(_) => Command::Check,
            Request::Version => Command::Version,
            Request::Gc => Command::Gc,
            Request::Status => Command::Status,
        }
    }
}

/// The `CNI_*` variables that were set to something non-empty, as UTF-8.
struct CniEnv {
    values: Vec<(&'static str, String)>,
}

impl CniEnv {
    fn collect<I, K, V>(vars: I) -> Result<Self, CniError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let mut values = Vec::new();
        for (name, value) in vars {
            let (name, value) = (name.into(), value.into());
            let Some(&known) = READ_VARIABLES.iter().find(|known| name == **known) else {
                continue;
            };
            let value = value.into_string().map_err(|raw| {
                CniError::invalid_environment(format!(
                    "{known} is not valid UTF-8: {raw:?}; CNI values must be UTF-8"
                ))
            })?;
            if !value.is_empty() {
                values.retain(|(name, _)| *name != known);
                values.push((known, value));
            }
        }
        Ok(Self { values })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, value)| value.as_str())
    }

    /// The values of `required`, or an error naming every one that is unset, in one message.
    fn require<const N: usize>(
        &self,
        command: Command,
        required: [&'static str; N],
    ) -> Result<[&str; N], CniError> {
        let values = required.map(|name| self.get(name));
        let missing: Vec<&str> = required
            .iter()
            .zip(&values)
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| *name)
            .collect();
        if missing.is_empty() {
            // Every value is `Some` here; the default is never used.
            return Ok(values.map(Option::unwrap_or_default));
        }
        Err(CniError::invalid_environment(format!(
            "{CNI_COMMAND}={command} requires {}, but {} {} not set; the container runtime sets \
             these when it runs a CNI plugin",
            required.join(", "),
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" },
        )))
    }

    fn attachment(&self, command: Command) -> Result<Attachment, CniError> {
        let [container_id, netns, ifname] =
            self.require(command, [CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME])?;
        Ok(Attachment {
            container_id: valid_container_id(container_id)?,
            netns: valid_netns(netns)?,
            ifname: valid_ifname(ifname)?,
            args: self.args()?,
        })
    }

    fn args(&self) -> Result<CniArgs, CniError> {
        CniArgs::parse(self.get(CNI_ARGS).unwrap_or_default())
    }
}

/// The same rule as the reference plugins: runtimes build file names from container IDs.
fn valid_container_id(id: &str) -> Result<String, CniError> {
    let valid = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(id.to_owned())
    } else {
        Err(CniError::invalid_environment(format!(
            "{CNI_CONTAINERID}={id:?} is not a valid container ID: it must start with a letter \
             or digit and contain only letters, digits, '_', '.' and '-'"
        )))
    }
}

fn valid_ifname(name: &str) -> Result<String, CniError> {
    check_interface_name(name).map_err(|reason| {
        CniError::invalid_environment(format!(
            "{CNI_IFNAME}={name:?} is not a valid interface name: {reason}"
        ))
    })?;
    Ok(name.to_owned())
}

fn valid_netns(path: &str) -> Result<PathBuf, CniError> {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(CniError::invalid_environment(format!(
            "{CNI_NETNS}={path:?} must be an absolute path to a network namespace, e.g. \
             /var/run/netns/cni-1234"
        )))
    }
}

/// Checks a Linux interface name (for `CNI_IFNAME` and interface names in configs), returning
/// why it is invalid.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(format!(
            "it is {} bytes long; Linux allows at most {MAX_INTERFACE_NAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are reserved".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| matches!(c, '/' | ':') || c.is_whitespace())
    {
        return Err(format!(
            "it contains {bad:?}; '/', ':' and whitespace are not allowed"
        ));
    }
    Ok(())
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
///
/// Like the reference plugins, an unknown key is an error unless `IgnoreUnknown` is true;
/// kubelet's runtimes always set `IgnoreUnknown=1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ignore_unknown: bool,
    pub pod: PodIdentity,
}

/// The pod a Kubernetes runtime is wiring up, from `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub infra_container_id: Option<String>,
    pub uid: Option<String>,
}

impl CniArgs {
    const KNOWN_KEYS: [&'static str; 5] = [
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
    ];

    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let mut pairs = Vec::new();
        for pair in raw.split(';').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                CniError::invalid_environment(format!(
                    "{CNI_ARGS} entry {pair:?} has no '='; {CNI_ARGS} must look like \
                     \"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0\""
                ))
            })?;
            if key.is_empty() {
                return Err(CniError::invalid_environment(format!(
                    "{CNI_ARGS} entry {pair:?} has an empty key before '='"
                )));
            }
            pairs.push((key, value));
        }

        let mut args = Self::default();
        if let Some(&(_, value)) = pairs.iter().rev().find(|(key, _)| *key == "IgnoreUnknown") {
            args.ignore_unknown = parse_flag(value)?;
        }
        for (key, value) in pairs {
            let value = (!value.is_empty()).then(|| value.to_owned());
            match key {
                "IgnoreUnknown" => {}
                "K8S_POD_NAMESPACE" => args.pod.namespace = value,
                "K8S_POD_NAME" => args.pod.name = value,
                "K8S_POD_INFRA_CONTAINER_ID" => args.pod.infra_container_id = value,
                "K8S_POD_UID" => args.pod.uid = value,
                _ if args.ignore_unknown => {}
                unknown => {
                    return Err(CniError::invalid_environment(format!(
                        "{CNI_ARGS} has the unknown key {unknown:?}; known keys are {}; add \
                         \"IgnoreUnknown=1\" to {CNI_ARGS} to ignore other keys",
                        Self::KNOWN_KEYS.join(", ")
                    )));
                }
            }
        }
        Ok(args)
    }
}

/// The boolean spellings the reference plugins accept for `IgnoreUnknown`.
fn parse_flag(value: &str) -> Result<bool, CniError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(CniError::invalid_environment(format!(
            "{CNI_ARGS} has IgnoreUnknown={value:?}; it must be 1, 0, true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;FOO=bar",
        ),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        name: &'static str,
        value: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut vars: Vec<_> = base.iter().copied().filter(|(n, _)| *n != name).collect();
        vars.push((name, value));
        vars
    }

    fn without(
        base: &[(&'static str, &'static str)],
        name: &str,
    ) -> Vec<(&'static str, &'static str)> {
        base.iter().copied().filter(|(n, _)| *n != name).collect()
    }

    fn env_error(vars: Vec<(&'static str, &'static str)>) -> CniError {
        let error = Inputs::from_vars(vars).expect_err("environment must be rejected");
        assert_eq!(error.code, ErrorCode::INVALID_ENVIRONMENT, "{}", error.msg);
        error
    }

    #[test]
    fn add_parses_every_variable() -> Result<(), CniError> {
        let inputs = Inputs::from_vars(with(&ADD, "CNI_PATH", "/opt/cni/bin:/usr/libexec/cni"))?;
        assert_eq!(inputs.command(), Command::Add);
        assert_eq!(
            inputs.cni_path,
            [
                PathBuf::from("/opt/cni/bin"),
                PathBuf::from("/usr/libexec/cni")
            ]
        );
        let Request::Add(attachment) = inputs.request else {
            panic!("expected ADD");
        };
        assert_eq!(attachment.container_id, "abc123");
        assert_eq!(attachment.netns, PathBuf::from("/var/run/netns/cni-1"));
        assert_eq!(attachment.ifname, "eth0");
        assert!(attachment.args.ignore_unknown);
        assert_eq!(
            attachment.args.pod,
            PodIdentity {
                namespace: Some("default".into()),
                name: Some("web-0".into()),
                infra_container_id: None,
                uid: Some("u-1".into()),
            }
        );
        Ok(())
    }

    #[test]
    fn version_gc_and_status_need_nothing_else() -> Result<(), CniError> {
        for (value, command) in [
            ("VERSION", Command::Version),
            ("GC", Command::Gc),
            ("STATUS", Command::Status),
        ] {
            assert_eq!(
                Inputs::from_vars([("CNI_COMMAND", value)])?.command(),
                command
            );
        }
        Ok(())
    }

    #[test]
    fn del_tolerates_a_missing_netns() -> Result<(), CniError> {
        let inputs = Inputs::from_vars(with(&without(&ADD, "CNI_NETNS"), "CNI_COMMAND", "DEL"))?;
        let Request::Del(detachment) = inputs.request else {
            panic!("expected DEL");
        };
        assert_eq!(detachment.netns, None);
        Ok(())
    }

    #[test]
    fn missing_command_is_named() {
        let error = env_error(without(&ADD, "CNI_COMMAND"));
        assert!(
            error.msg.starts_with("CNI_COMMAND is not set"),
            "{}",
            error.msg
        );
    }

    #[test]
    fn unknown_command_lists_the_valid_ones() {
        let error = env_error(with(&ADD, "CNI_COMMAND", "add"));
        assert!(
            error.msg.contains("ADD, DEL, CHECK, VERSION, GC, STATUS"),
            "{}",
            error.msg
        );
    }

    #[test]
    fn add_and_check_name_each_missing_variable() {
        for command in ["ADD", "CHECK"] {
            for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
                let error = env_error(with(&without(&ADD, missing), "CNI_COMMAND", command));
                assert!(
                    error.msg.contains(&format!("but {missing} is not set")),
                    "{}",
                    error.msg
                );
            }
        }
        let error = env_error(vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x")]);
        assert!(
            error.msg.contains("but CNI_NETNS, CNI_IFNAME are not set"),
            "{}",
            error.msg
        );
    }

    #[test]
    fn empty_values_count_as_unset() {
        let error = env_error(with(&ADD, "CNI_IFNAME", ""));
        assert!(error.msg.contains("CNI_IFNAME is not set"), "{}", error.msg);
    }

    #[test]
    fn malformed_values_are_rejected_with_the_reason() {
        let cases = [
            ("CNI_IFNAME", "eth0/1", "'/'"),
            ("CNI_IFNAME", "a-very-long-interface", "at most 15"),
            (
                "CNI_CONTAINERID",
                "-abc",
                "must start with a letter or digit",
            ),
            ("CNI_NETNS", "netns/cni-1", "absolute path"),
            ("CNI_ARGS", "K8S_POD_NAME", "has no '='"),
            ("CNI_ARGS", "=x", "empty key"),
            ("CNI_ARGS", "FOO=bar", "add \"IgnoreUnknown=1\""),
            ("CNI_ARGS", "IgnoreUnknown=maybe", "1, 0, true or false"),
        ];
        for (name, value, needle) in cases {
            let error = env_error(with(&ADD, name, value));
            assert!(error.msg.contains(name), "{}", error.msg);
            assert!(error.msg.contains(needle), "{name}={value}: {}", error.msg);
        }
    }

    #[test]
    fn cni_args_tolerates_empty_segments_and_ignore_unknown_spellings() -> Result<(), CniError> {
        let args = CniArgs::parse(";IgnoreUnknown=true;;X=1;K8S_POD_NAME=a;")?;
        assert!(args.ignore_unknown);
        assert_eq!(args.pod.name.as_deref(), Some("a"));
        assert_eq!(CniArgs::parse("")?, CniArgs::default());
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_value_is_rejected() {
        use std::os::unix::ffi::OsStringExt;
        let vars = vec![
            (OsString::from("CNI_COMMAND"), OsString::from("ADD")),
            (
                OsString::from("CNI_IFNAME"),
                OsString::from_vec(vec![0xff, 0xfe]),
            ),
        ];
        let error = Inputs::from_vars(vars).expect_err("not UTF-8");
        assert!(
            error.msg.starts_with("CNI_IFNAME is not valid UTF-8"),
            "{}",
            error.msg
        );
    }
}
