//! Reading a JSON object field by field.
//!
//! serde's derive reports a wrongly typed field as "invalid type: integer `5`, expected a string"
//! without saying which field, and its unknown-field error cannot mention aliases. Network configs
//! are written by hand, so every error here names the key by its full path (`ipam.timeout_ms`,
//! `prevResult.ips[0].address`), says what it must be, and shows what it got.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::CniError;

/// Reads the fields of one JSON object and remembers which keys were asked for, so
/// [`finish`](Self::finish) can reject the ones nobody knows.
///
/// JSON `null` counts as absent, as it does for the reference (Go) plugins.
pub struct FieldReader<'a> {
    path: String,
    fields: &'a Map<String, Value>,
    known: Vec<&'static str>,
    /// [`finish`](Self::finish) accepts unknown keys (teardown commands only).
    ignore_unknown: bool,
}

impl<'a> FieldReader<'a> {
    /// `path` is where the object sits in the config (`""` for the top level, `"ipam"`,
    /// `"prevResult.ips[0]"`); it prefixes every message.
    pub fn new(path: impl Into<String>, fields: &'a Map<String, Value>) -> Self {
        Self {
            path: path.into(),
            fields,
            known: Vec::new(),
            ignore_unknown: false,
        }
    }

    /// A reader whose [`finish`](Self::finish) accepts keys nobody asked for, as do the readers
    /// of its nested objects.
    pub fn ignoring_unknown_keys(mut self) -> Self {
        self.ignore_unknown = true;
        self
    }

    fn child(&self, path: String, fields: &'a Map<String, Value>) -> Self {
        Self {
            ignore_unknown: self.ignore_unknown,
            ..Self::new(path, fields)
        }
    }

    /// The full path of `key` inside this object, as messages show it.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Marks `key` as known and returns its value, if set.
    pub fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        self.fields.get(key).filter(|value| !value.is_null())
    }

    /// Reads `key` through `convert`, which returns `None` when the value is not
    /// `expected` (a phrase such as `a number of milliseconds in 1..=120000`).
    pub fn get<T>(
        &mut self,
        key: &'static str,
        expected: &str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, CniError> {
        let path = self.path_of(key);
        self.raw(key)
            .map(|value| convert(value).ok_or_else(|| mismatch(&path, expected, value)))
            .transpose()
    }

    /// Like [`get`](Self::get), but a missing key is an error too.
    pub fn require<T>(
        &mut self,
        key: &'static str,
        expected: &str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T, CniError> {
        self.get(key, expected, convert)?.ok_or_else(|| {
            CniError::invalid_config(format!(
                "{} is missing; it must be {expected}",
                self.path_of(key)
            ))
        })
    }

    pub fn string(
        &mut self,
        key: &'static str,
        expected: &str,
    ) -> Result<Option<&'a str>, CniError> {
        self.get(key, expected, Value::as_str)
    }

    pub fn bool(&mut self, key: &'static str) -> Result<Option<bool>, CniError> {
        self.get(key, "true or false", Value::as_bool)
    }

    /// Reads a list whose entries must each be `item_expected`; a bad entry is reported by its
    /// index (`serviceCIDRs[1]`).
    pub fn list<T>(
        &mut self,
        key: &'static str,
        item_expected: &str,
        mut convert_item: impl FnMut(&'a Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>, CniError> {
        let path = self.path_of(key);
        let Some(value) = self.raw(key) else {
            return Ok(None);
        };
        let items = value.as_array().ok_or_else(|| {
            mismatch(&path, &format!("a list, each entry {item_expected}"), value)
        })?;
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                convert_item(item)
                    .ok_or_else(|| mismatch(&format!("{path}[{index}]"), item_expected, item))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Reads a nested object, handing back a reader for its fields.
    pub fn object(
        &mut self,
        key: &'static str,
        expected: &str,
    ) -> Result<Option<FieldReader<'a>>, CniError> {
        let path = self.path_of(key);
        let nested = self.get(key, expected, Value::as_object)?;
        Ok(nested.map(|fields| self.child(path, fields)))
    }

    /// Reads a list of objects, parsing each with `parse` through a reader whose path ends in
    /// the entry's index.
    pub fn objects<T>(
        &mut self,
        key: &'static str,
        item_expected: &str,
        mut parse: impl FnMut(FieldReader<'a>) -> Result<T, CniError>,
    ) -> Result<Option<Vec<T>>, CniError> {
        let path = self.path_of(key);
        let Some(items) = self.list(key, item_expected, Value::as_object)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .enumerate()
            .map(|(index, fields)| parse(self.child(format!("{path}[{index}]"), fields)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// For a key that was renamed: returns whichever of `key` and its older name `alias` is set
    /// (`key` when neither is), and rejects a config that sets both.
    pub fn either(
        &mut self,
        key: &'static str,
        alias: &'static str,
    ) -> Result<&'static str, CniError> {
        match (self.raw(key).is_some(), self.raw(alias).is_some()) {
            (true, true) => Err(CniError::invalid_config(format!(
                "{} and {} are the same setting ({alias} is its older name); keep only {key}",
                self.path_of(key),
                self.path_of(alias),
            ))),
            (false, true) => Ok(alias),
            _ => Ok(key),
        }
    }

    /// Rejects keys that none of the reads above asked for, listing the accepted ones and
    /// suggesting the intended key for near-misses such as `defaultSubnet`.
    pub fn finish(self) -> Result<(), CniError> {
        if self.ignore_unknown {
            return Ok(());
        }
        let unknown: Vec<String> = self
            .fields
            .keys()
            .filter(|key| !self.known.contains(&key.as_str()))
            .map(
                |key| match self.known.iter().find(|known| probably_meant(known, key)) {
                    Some(known) => format!("{key:?} (did you mean {known:?}?)"),
                    None => format!("{key:?}"),
                },
            )
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let (owner, accepted) = if self.path.is_empty() {
            (
                "the network config",
                "accepted fields besides the standard CNI keys",
            )
        } else {
            (self.path.as_str(), "accepted fields")
        };
        let noun = if unknown.len() == 1 {
            "an unknown field"
        } else {
            "unknown fields"
        };
        Err(CniError::invalid_config(format!(
            "{owner} has {noun} {}; {accepted}: {}",
            unknown.join(", "),
            self.known.join(", ")
        )))
    }

    /// The entries none of the reads above asked for, e.g. a plugin's own keys once the standard
    /// CNI keys have been read.
    pub fn into_unread(self) -> Map<String, Value> {
        self.fields
            .iter()
            .filter(|(key, _)| !self.known.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }
}

/// For [`FieldReader::get`]: a string holding an absolute path.
pub fn as_absolute_path(value: &Value) -> Option<&Path> {
    value
        .as_str()
        .map(Path::new)
        .filter(|path| path.is_absolute())
}

fn mismatch(path: &str, expected: &str, got: &Value) -> CniError {
    CniError::invalid_config(format!("{path} must be {expected}; got {}", describe(got)))
}

/// A short description of a JSON value for messages: strings are quoted and cut at 64
/// characters, containers are named rather than dumped.
pub fn describe(value: &Value) -> String {
    const SHOWN_CHARS: usize = 64;
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => format!("the number {number}"),
        Value::String(text) if text.chars().count() > SHOWN_CHARS => {
            let shown: String = text.chars().take(SHOWN_CHARS).collect();
            format!("{shown:?}…")
        }
        Value::String(text) => format!("{text:?}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// Whether an unknown key was probably meant as `known`: equal once case, `_` and `-` are
/// ignored (`defaultSubnet` → `default_subnet`), or a prefix of it (`timeout` → `timeout_ms`).
fn probably_meant(known: &str, unknown: &str) -> bool {
    // Shorter prefixes ("log", "ip") would suggest almost anything.
    const MIN_PREFIX_LEN: usize = 4;
    let normalize = |key: &str| -> String {
        key.chars()
            .filter(|c| !matches!(c, '_' | '-'))
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let (known, unknown) = (normalize(known), normalize(unknown));
    known == unknown || (unknown.len() >= MIN_PREFIX_LEN && known.starts_with(&unknown))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::error::ErrorCode;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("test fixture must be an object, got {other}"),
        }
    }

    #[test]
    fn type_mismatch_names_the_full_path_and_the_value() {
        let fields = object(json!({"default_subnet": 5}));
        let mut reader = FieldReader::new("ipam", &fields);
        let error = reader
            .string("default_subnet", "a string naming a Subnet")
            .expect_err("a number is not a string");
        assert_eq!(error.code, ErrorCode::INVALID_NETWORK_CONFIG);
        assert_eq!(
            error.msg,
            "ipam.default_subnet must be a string naming a Subnet; got the number 5"
        );
    }

    #[test]
    fn null_counts_as_absent() -> Result<(), CniError> {
        let fields = object(json!({"log_file": null}));
        let mut reader = FieldReader::new("ipam", &fields);
        assert_eq!(reader.string("log_file", "a path")?, None);
        reader.finish()
    }

    #[test]
    fn missing_required_key_says_what_it_must_be() {
        let fields = object(json!({}));
        let error = FieldReader::new("", &fields)
            .require("type", "the plugin's name", Value::as_str)
            .expect_err("type is missing");
        assert_eq!(error.msg, "type is missing; it must be the plugin's name");
    }

    #[test]
    fn bad_list_entry_is_reported_by_index() {
        let fields = object(json!({"serviceCIDRs": ["10.96.0.0/12", 7]}));
        let error = FieldReader::new("", &fields)
            .list("serviceCIDRs", "a CIDR", Value::as_str)
            .expect_err("7 is not a string");
        assert_eq!(
            error.msg,
            "serviceCIDRs[1] must be a CIDR; got the number 7"
        );
    }

    #[test]
    fn list_given_a_scalar_says_it_must_be_a_list() {
        let fields = object(json!({"serviceCIDRs": "10.96.0.0/12"}));
        let error = FieldReader::new("", &fields)
            .list("serviceCIDRs", "a CIDR", Value::as_str)
            .expect_err("a string is not a list");
        assert!(
            error
                .msg
                .starts_with("serviceCIDRs must be a list, each entry a CIDR; got \"10.96")
        );
    }

    #[test]
    fn nested_objects_carry_their_index_in_the_path() {
        let fields = object(json!({"ips": [{"address": "10.0.0.1/24"}, {"address": 1}]}));
        let error = FieldReader::new("prevResult", &fields)
            .objects("ips", "an IP object", |mut ip| {
                ip.string("address", "a CIDR")
            })
            .expect_err("second address is a number");
        assert_eq!(
            error.msg,
            "prevResult.ips[1].address must be a CIDR; got the number 1"
        );
    }

    #[test]
    fn unknown_fields_list_the_accepted_ones_and_suggest_near_misses() -> Result<(), CniError> {
        let fields = object(json!({"type": "virtnet-ipam", "defaultSubnet": "x", "color": "red"}));
        let mut reader = FieldReader::new("ipam", &fields);
        reader.string("type", "a string")?;
        reader.string("default_subnet", "a string")?;
        let error = reader.finish().expect_err("two unknown fields");
        assert_eq!(
            error.msg,
            "ipam has unknown fields \"color\", \"defaultSubnet\" (did you mean \"default_subnet\"?); \
             accepted fields: type, default_subnet"
        );
        Ok(())
    }

    #[test]
    fn near_misses_are_suggested_but_short_prefixes_are_not() {
        assert!(probably_meant("default_subnet", "defaultSubnet"));
        assert!(probably_meant("default_subnet", "Default-Subnet"));
        assert!(probably_meant("timeout_ms", "timeout"));
        assert!(!probably_meant("log_level", "log"));
        assert!(!probably_meant("timeout_ms", "timeout_seconds"));
    }

    #[test]
    fn either_accepts_one_spelling_and_rejects_both() -> Result<(), CniError> {
        let old = object(json!({"ipam_unix_socket_path": "/run/a.sock"}));
        let mut reader = FieldReader::new("ipam", &old);
        assert_eq!(
            reader.either("agent_socket", "ipam_unix_socket_path")?,
            "ipam_unix_socket_path"
        );
        reader.finish()?;

        let both = object(json!({"agent_socket": "/a", "ipam_unix_socket_path": "/b"}));
        let error = FieldReader::new("ipam", &both)
            .either("agent_socket", "ipam_unix_socket_path")
            .expect_err("both set");
        assert!(
            error.msg.contains("keep only agent_socket"),
            "{}",
            error.msg
        );
        Ok(())
    }

    #[test]
    fn into_unread_keeps_only_the_keys_nobody_read() -> Result<(), CniError> {
        let fields = object(json!({"cniVersion": "1.0.0", "mode": "auto"}));
        let mut reader = FieldReader::new("", &fields);
        reader.string("cniVersion", "a version")?;
        assert_eq!(Value::Object(reader.into_unread()), json!({"mode": "auto"}));
        Ok(())
    }

    #[test]
    fn long_strings_are_cut() {
        let described = describe(&Value::String("x".repeat(100)));
        assert_eq!(described, format!("{:?}…", "x".repeat(64)));
    }
}
