//! Kubernetes label selectors (matchLabels + matchExpressions), without depending on k8s types.

use std::collections::BTreeMap;
use std::fmt;

/// The operator of a [`LabelRequirement`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent, or its value is none of `values`.
    NotIn,
    /// The label is present (any value).
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelRequirement {
    /// The label key.
    pub key: String,
    /// How the label is compared.
    pub operator: SelectorOperator,
    /// The values for `In` / `NotIn` (ignored by `Exists` / `DoesNotExist`).
    pub values: Vec<String>,
}

/// A Kubernetes `LabelSelector`: every `match_labels` pair and every requirement must hold.
/// The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    pub match_expressions: Vec<LabelRequirement>,
}

impl LabelRequirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        let listed = value.is_some_and(|value| self.values.contains(value));
        match self.operator {
            SelectorOperator::In => listed,
            SelectorOperator::NotIn => !listed,
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self
                .match_expressions
                .iter()
                .all(|requirement| requirement.matches(labels))
    }
}

impl fmt::Display for LabelRequirement {
    /// kubectl's selector syntax: `key in (a,b)`, `key notin (a)`, `key`, `!key`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = self.values.join(",");
        match self.operator {
            SelectorOperator::In => write!(f, "{} in ({values})", self.key),
            SelectorOperator::NotIn => write!(f, "{} notin ({values})", self.key),
            SelectorOperator::Exists => write!(f, "{}", self.key),
            SelectorOperator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

impl fmt::Display for LabelSelector {
    /// kubectl's selector syntax, e.g. `team=a,env in (prod,staging),!legacy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .chain(self.match_expressions.iter().map(ToString::to_string))
            .collect();
        if terms.is_empty() {
            f.write_str("(matches everything)")
        } else {
            f.write_str(&terms.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn requirement(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelRequirement {
        LabelRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_exact_values() {
        let selector = LabelSelector {
            match_labels: labels(&[("team", "a")]),
            ..Default::default()
        };
        assert!(selector.matches(&labels(&[("team", "a"), ("x", "y")])));
        assert!(!selector.matches(&labels(&[("team", "b")])));
        assert!(!selector.matches(&labels(&[])));
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        use SelectorOperator::*;
        let env = |value: Option<&str>| match value {
            Some(value) => labels(&[("env", value)]),
            None => labels(&[]),
        };
        let cases = [
            (
                requirement("env", In, &["prod", "staging"]),
                [true, false, false],
            ),
            (
                requirement("env", NotIn, &["prod", "staging"]),
                [false, true, true],
            ),
            (requirement("env", Exists, &[]), [true, true, false]),
            (requirement("env", DoesNotExist, &[]), [false, false, true]),
        ];
        for (requirement, expected) in cases {
            let actual = [env(Some("prod")), env(Some("dev")), env(None)]
                .map(|labels| requirement.matches(&labels));
            assert_eq!(actual, expected, "{requirement}");
        }
    }

    #[test]
    fn all_terms_must_hold_and_display_like_kubectl() {
        let selector = LabelSelector {
            match_labels: labels(&[("team", "a")]),
            match_expressions: vec![
                requirement("env", SelectorOperator::In, &["prod", "staging"]),
                requirement("legacy", SelectorOperator::DoesNotExist, &[]),
                requirement("zone", SelectorOperator::Exists, &[]),
                requirement("tier", SelectorOperator::NotIn, &["db"]),
            ],
        };
        assert_eq!(
            selector.to_string(),
            "team=a,env in (prod,staging),!legacy,zone,tier notin (db)"
        );
        assert!(selector.matches(&labels(&[("team", "a"), ("env", "prod"), ("zone", "z1")])));
        assert!(!selector.matches(&labels(&[("team", "a"), ("env", "prod")])));
        assert!(!selector.matches(&labels(&[
            ("team", "a"),
            ("env", "prod"),
            ("zone", "z1"),
            ("legacy", "yes")
        ])));
        assert_eq!(LabelSelector::default().to_string(), "(matches everything)");
    }
}
